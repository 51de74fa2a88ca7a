"""A round's sealed plan and the records of its steps, kept in the campaign's storage.

The storage is written only by the round's own tasks (no UI or API user can reach it), so it is
where a round's instructions live: ``prepare`` seals the plan there (``round-NNNN/plan.json``,
written aside and renamed), and every later task finds it from the DAG's own storage and the
run's validated campaign and round (``load_plan``), checks that it is this DAG's, this
campaign's and this round's, and obeys it.

Each step records what it did, and under which plan (the plan file's sha256), in
``round-NNNN/steps/``. A step reads the records of the steps before it only when they were made
under the same plan: training requires the push, the pull requires the training, the
aggregation the pulls, the manifest the aggregation. So a plan sealed again with other contents
(``prepare`` run again after the config changed) voids what was done under the earlier one,
and the manifest's plan hash is the one every step obeyed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import PlanError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.rounds.plan import RoundPlan
from xffl_airflow.federation.sealing import now, read_record, read_sealed, seal, write_record

__all__ = ["SealedPlan", "aggregate_result", "load_plan", "now", "require_step", "seal_plan", "step_problem",
           "step_result", "write_aggregate_record", "write_step"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealedPlan:
    """A round's plan as stored, with the sha256 of its file."""

    plan: RoundPlan
    sha256: str
    path: Path

    @property
    def layout(self) -> CampaignLayout:
        return CampaignLayout(Path(self.plan.storage), self.plan.campaign)

    @property
    def round(self) -> int:
        return self.plan.round

    def where(self) -> str:
        return f"campaign {self.plan.campaign} round {self.plan.round}"


def _read_plan(path: Path) -> SealedPlan:
    plan, sha = read_sealed(RoundPlan, path, what="round's plan")
    return SealedPlan(plan, sha, path)


def seal_plan(plan: RoundPlan) -> SealedPlan:
    """Writes the round's plan into its storage (aside, then renamed). A plan already sealed for
    this round with the same contents is kept as it is (a retried ``prepare``: the steps done
    under it stay valid); one with other contents is replaced, and says so."""
    path = CampaignLayout(Path(plan.storage), plan.campaign).plan(plan.round)
    stands, sha = seal(plan, path, what=f"campaign {plan.campaign} round {plan.round}'s plan", log=log)
    return SealedPlan(stands, sha, path)


def load_plan(dag: FederationDag, campaign: str, round_number: int) -> SealedPlan:
    """The sealed plan of ``campaign``'s round ``round_number`` in ``dag``'s storage, checked to
    be ``dag``'s, that campaign's and that round's."""
    layout = CampaignLayout(dag.storage, campaign)
    path = layout.plan(round_number)
    if not path.is_file():
        raise PlanError(
            f"campaign {campaign} round {round_number}: no sealed plan at {path}; the round's prepare "
            "task has not succeeded in this run (clear it to run the round)"
        )
    sealed = _read_plan(path)
    plan = sealed.plan
    found = (plan.dag_id, plan.campaign, plan.round, plan.storage)
    expected = (dag.dag_id, campaign, round_number, str(dag.storage))
    if found != expected:
        raise PlanError(
            f"{path}: the plan is for DAG {plan.dag_id}, campaign {plan.campaign}, round {plan.round}, "
            f"storage {plan.storage}; this run is DAG {dag.dag_id}, campaign {campaign}, round "
            f"{round_number}, storage {dag.storage}: nothing is obeyed"
        )
    return sealed


# -- step records ------------------------------------------------------------------------


def write_step(sealed: SealedPlan, facility: str, step: str, result: dict[str, Any]) -> Path:
    """Records that ``step`` succeeded at ``facility`` under ``sealed``'s plan, and its result."""
    path = sealed.layout.step_record(sealed.round, facility, step)
    return write_record(path, sealed.sha256, {"step": step, "facility": facility}, result)


_record = read_record


def step_result(sealed: SealedPlan, facility: str, step: str) -> dict[str, Any] | None:
    """The result of ``step`` at ``facility`` if it succeeded under this plan, else None."""
    record = _record(sealed.layout.step_record(sealed.round, facility, step))
    if record is None or record.get("plan_sha256") != sealed.sha256:
        return None
    return record["result"]


def step_problem(sealed: SealedPlan, facility: str, step: str) -> str | None:
    """Why ``step`` at ``facility`` does not count for this plan (None when it does)."""
    record = _record(sealed.layout.step_record(sealed.round, facility, step))
    if record is None:
        return f"its {step} has not succeeded in this round"
    if record.get("plan_sha256") != sealed.sha256:
        return (
            f"its {step} ran under another plan of this round (sha256 {str(record.get('plan_sha256'))[:12]}..., "
            f"now {sealed.sha256[:12]}...); clear its tasks to run them under this one"
        )
    return None


def require_step(sealed: SealedPlan, facility: str, step: str, *, before: str) -> dict[str, Any]:
    """The result of ``step`` under this plan; a ``PlanError`` naming the facility if there is none."""
    problem = step_problem(sealed, facility, step)
    if problem is not None:
        raise PlanError(f"{sealed.where()}: {facility} cannot {before}: {problem}")
    return step_result(sealed, facility, step) or {}


def write_aggregate_record(sealed: SealedPlan, result: dict[str, Any]) -> Path:
    return write_record(sealed.layout.aggregate_record(sealed.round), sealed.sha256, {"step": "aggregate"}, result)


def aggregate_result(sealed: SealedPlan) -> dict[str, Any]:
    record = _record(sealed.layout.aggregate_record(sealed.round))
    if record is None or record.get("plan_sha256") != sealed.sha256:
        raise PlanError(f"{sealed.where()}: the aggregation has not succeeded under this plan; clear aggregate")
    return record["result"]
