"""Which round a running task belongs to, and its sealed plan: from the DAG's own identity (fixed
when the DAG was built) and the run's validated parameters, never from XCom.

The campaign is the run's ``campaign`` parameter (checked), else a scheduled run's own, else the
config's; the round is the run's ``round`` parameter (checked). Both were validated by Airflow
against the DAG's parameter schema when the run was triggered, and are checked again here.
"""

from __future__ import annotations

from typing import Any

from xffl_airflow.federation.names import FederationDag, campaign_for_run, check_round
from xffl_airflow.federation.rounds.store import SealedPlan, load_plan


def run_type_of(dag_run: Any) -> str:
    value = getattr(dag_run, "run_type", None)
    return str(getattr(value, "value", value))


def run_conf(context: Any) -> dict[str, Any]:
    """Every key the run was given: the form's fields (``params``) and anything in its conf."""
    dag_run = context["dag_run"]
    return {**dict(context["params"]), **dict(getattr(dag_run, "conf", None) or {})}


def round_of_run(dag: FederationDag, context: Any) -> tuple[str, int]:
    """``(campaign, round)`` of the running task's run."""
    conf = run_conf(context)
    campaign = campaign_for_run(dag.campaign, requested=conf.get("campaign") or None,
                                run_type=run_type_of(context["dag_run"]), logical_date=context.get("logical_date"))  # fmt: skip
    return campaign, check_round(conf.get("round", 0))


def sealed_plan(dag: FederationDag, context: Any) -> SealedPlan:
    """The running round's sealed plan, checked to be this DAG's, campaign's and round's."""
    campaign, round_number = round_of_run(dag, context)
    return load_plan(dag, campaign, round_number)
