"""Builds the federation DAG of one config file: one run is one round of one campaign.

    prepare -> per facility [push -> train (Slurm, deferred) -> pull] -> aggregate -> finalize
            -> continue? -> next round (run id from campaign and round)

Wiring only: what the tasks do is in ``rounds/``. ``prepare`` seals the round's plan into the
campaign's storage; every later task reads it from there (``rounds.context.sealed_plan``: the
DAG's own storage and the run's validated campaign and round) and obeys nothing else. XCom
carries what the UI shows, never what a task obeys, and no task reads the config file after
``prepare`` (docs/security.md, R10).

Building reads and validates the config and, in the dag-processor, looks up the facilities'
connections in Airflow (no torch, no network), so a config that does not validate, or names a
connection Airflow does not have, is an import error of the DAG file that names the file and the
field, and no run can start. A task's own parse of the DAG file skips the lookups (``prepare``
checks the connections when a round starts).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from functools import partial

from airflow.sdk import DAG, Param, TaskGroup, get_parsing_context, task
from airflow.sdk.definitions.context import get_current_context
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.assets import global_model_asset
from xffl_airflow.federation.config import load_config
from xffl_airflow.federation.connections import refuse_missing_connections
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.next_round import ReleaseTriggerOperator, SealedNextRoundOperator
from xffl_airflow.federation.rounds.train import RoundTrainOperator

log = logging.getLogger(__name__)

DOC = """
### xFFL federation, one round per run

Config: `{config}`; facilities: {facilities}.

Trigger with `campaign` and `round` (0 starts a campaign); the run of round N+1 is triggered by
round N unless the campaign converged. Retries of a facility's push, train and pull are
automatic; a facility that still fails is left out of the round if the quorum allows.

A run may change only the settings the config opens (shown in the form, the config's values
pre-filled): {knobs}. Commands, paths, connections, sbatch options and storage are the config
file's alone. `prepare` seals the round's plan into the campaign's storage
(`round-NNNN/plan.json`); every later task obeys that plan and nothing else.
{warnings}"""


# Local steps (prepare, aggregate, finalize, the decision) retry what passes: Airflow's API or
# database away for a while, a full disk freed. What the round refuses does not pass and fails
# at once (see ``_refusals_fail_at_once``).
LOCAL_RETRIES = {
    "retries": 3,
    "retry_delay": timedelta(seconds=10),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=2),
}


# The exit status by which the training task says its input is wrong (xffl_tasks.train).
TRAINING_REFUSED_INPUT = (2,)


def _refusals_fail_at_once(step, /, *args, **kwargs):
    """Runs a round step; a config, run parameter or round refusal fails the task without retries."""
    from xffl_airflow.federation.errors import ConfigError, RoundError, RunConfError
    from xffl_airflow.secrets_scrub import scrub_env

    try:
        return step(*args, **kwargs)
    except (ConfigError, RunConfError, RoundError) as error:  # no run of a secret's value shown
        raise AirflowFailException(scrub_env(f"{type(error).__name__}: {error}")) from error


def _in_the_round(federation: FederationDag, step, /, *args):
    """Runs ``step(sealed_plan, *args)`` on the running round's sealed plan."""
    from xffl_airflow.federation.rounds.context import sealed_plan

    def run():
        return step(sealed_plan(federation, get_current_context()), *args)

    return _refusals_fail_at_once(run)


def _record_failure(federation: FederationDag, context) -> None:
    """A facility's step failed for good: keep why, in the round's storage (for the manifest)."""
    from xffl_airflow.federation.errors import FacilityRefused, RoundError
    from xffl_airflow.federation.rounds.context import sealed_plan
    from xffl_airflow.federation.rounds.transfers import record_failure

    ti = context["ti"]
    try:
        sealed = sealed_plan(federation, context)
    except RoundError:  # no plan: the round never started at the facility
        return
    error = context.get("exception")
    refused = isinstance(getattr(error, "__cause__", None), FacilityRefused)
    record_failure(sealed, ti.task_id.split(".", 1)[0], ti.task_id, ti.try_number, error, refused=refused)


def run_params(config) -> dict[str, Param]:
    """The trigger form: the campaign, the round, and one typed field per opened knob."""
    params = {
        # optional in the form (null allowed): empty means the config's campaign
        "campaign": Param(None, type=["null", "string"], maxLength=64, title="Campaign",
                          description="Empty: the config's campaign (a scheduled run starts a new one). "
                                      "1-64 of a-z, 0-9, _ and -, starting with a letter"),
        "round": Param(0, type="integer", minimum=0, maximum=1_000_000, title="Round",
                       description="0 starts the campaign; later rounds are triggered by the previous one"),
    }  # fmt: skip
    defaults = config.knob_defaults()
    for knob in config.knobs:
        params[knob.param] = Param(
            defaults[knob.param], title=knob.path, description=f"{knob.help} (the config's value by default)",
            **knob.schema(),
        )  # fmt: skip
    return params


def build_federation_dag(config_path: str) -> DAG:
    config = load_config(config_path)
    if get_parsing_context().dag_id is None:  # the dag-processor, not a task's own parse
        refuse_missing_connections(config, config_path)
    federation = FederationDag.of(config, config_path)
    names = [f.name for f in config.facilities]
    for warning in config.warnings:
        log.warning("%s: %s", config_path, warning)
    remote_retries = {
        "retries": config.retry.retries,
        "retry_delay": timedelta(seconds=config.retry.retry_delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=config.retry.max_retry_delay_s),
        "on_failure_callback": partial(_record_failure, federation),
    }
    with DAG(
        dag_id=federation.dag_id,
        description=config.description or f"xFFL federation {config.campaign}: one round per run",
        schedule=config.schedule,
        start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        render_template_as_native_obj=True,
        tags=["xffl", "federated-learning"],
        params=run_params(config),
        doc_md=DOC.format(
            config=config_path, facilities=", ".join(names),
            knobs=", ".join(f"`{k.param}`" for k in config.knobs) or "none",
            warnings="".join(f"\n**Warning:** {w}.\n" for w in config.warnings),
        ),  # fmt: skip
    ) as dag:

        # a short circuit: a new campaign's round 0 while another campaign of this DAG is in
        # flight seals no plan, and the whole run is skipped (rounds.prepare says why)
        @task.short_circuit(**LOCAL_RETRIES)
        def prepare() -> dict | None:
            from xffl_airflow.federation.rounds.context import run_conf, run_type_of
            from xffl_airflow.federation.rounds.prepare import prepare_round, shown

            context = get_current_context()
            # every key the run was given (the form's fields and anything else in its conf):
            # what the config did not open is refused by name before any facility work
            sealed = _refusals_fail_at_once(
                prepare_round,
                dag=federation,
                dag_facilities=names,
                run_conf=run_conf(context),
                run_type=run_type_of(context["dag_run"]),
                run=context["run_id"],
                logical_date=context.get("logical_date"),
                active_runs=lambda run_ids: context["ti"].get_dr_count(
                    dag_id=dag.dag_id, run_ids=run_ids, states=["queued", "running"]
                ),
            )
            return shown(sealed) if sealed is not None else None

        prepared = prepare()
        pulls = []
        for name in names:
            with TaskGroup(group_id=name, tooltip=f"facility {name}: push, train, pull"):

                @task(task_id="push", **remote_retries)
                def push(facility: str = name) -> dict:
                    from xffl_airflow.federation.rounds.transfers import push_step

                    return _in_the_round(federation, push_step, facility)

                train = RoundTrainOperator(
                    task_id="train",
                    facility=name,
                    federation=federation,
                    ssh_conn_id=config.facility(name).connection_id,
                    timeout=timedelta(hours=config.retry.train_timeout_h),
                    # xffl_tasks.train exits 2 on a bad config, missing data or a launch
                    # environment that does not add up: a retry would queue again for nothing
                    fail_fast_exit_codes=TRAINING_REFUSED_INPUT,
                    **remote_retries,
                )

                @task(task_id="pull", **remote_retries)
                def pull(facility: str = name) -> dict:
                    from xffl_airflow.federation.rounds.transfers import pull_step

                    return _in_the_round(federation, pull_step, facility)

                pulled = pull()
                prepared >> push() >> train >> pulled
                pulls.append(pulled)

        @task(trigger_rule="all_done", **LOCAL_RETRIES)
        def aggregate() -> dict:
            from xffl_airflow.federation.rounds.aggregate import aggregate_step

            result = _in_the_round(federation, aggregate_step)
            report = result["report"]
            return {k: result[k] for k in ("participants", "missing", "rejected", "path")} | {
                "strategy": report.get("strategy"), "global_update_norm": report.get("global_update_norm"),
            }  # fmt: skip

        global_model = global_model_asset(config)

        # every finished round emits an event of the config's global-model asset (assets.py)
        @task(outlets=[global_model], **LOCAL_RETRIES)
        def finalize() -> dict:
            from airflow.utils.helpers import build_airflow_dagrun_url

            from xffl_airflow.federation.rounds.finalize import finalize_step

            context = get_current_context()
            decision = _in_the_round(
                federation, partial(
                    finalize_step, run=context["run_id"],
                    run_url=lambda run_id: build_airflow_dagrun_url(dag_id=dag.dag_id, run_id=run_id),
                ),
            )  # fmt: skip
            context["outlet_events"][global_model].extra = decision["global_model"]
            return decision

        @task.short_circuit(**LOCAL_RETRIES)
        def continue_campaign() -> bool:
            from xffl_airflow.federation.rounds.finalize import round_manifest

            manifest = _in_the_round(federation, round_manifest)
            return not (manifest.get("decision") or {}).get("stop")

        next_round = SealedNextRoundOperator(
            task_id="next_round", federation=federation, retries=3, retry_delay=timedelta(seconds=10),
        )  # fmt: skip
        finalized = finalize()
        pulls >> aggregate() >> finalized >> continue_campaign() >> next_round
        if config.release is not None:  # the ended campaign's release run (releases/dag.py)

            @task.short_circuit(**LOCAL_RETRIES)
            def campaign_ended() -> bool:
                from xffl_airflow.federation.rounds.finalize import round_manifest

                manifest = _in_the_round(federation, round_manifest)
                return bool((manifest.get("decision") or {}).get("stop"))

            start_release = ReleaseTriggerOperator(
                task_id="start_release", federation=federation, retries=3, retry_delay=timedelta(seconds=10),
            )  # fmt: skip
            finalized >> campaign_ended() >> start_release
    if config.release is not None:
        from xffl_airflow.federation.releases.dag import build_release_dag

        build_release_dag(config, config_path, federation, LOCAL_RETRIES)
    return dag


def build_federation_dags(config_paths: list[str]) -> list[DAG]:
    """The DAGs of several configs (one DAG file serving a deployment). Two configs that would
    make the same DAG id (``a-b`` and ``a_b``) would share a DAG and its campaigns: refused,
    naming both files, before any DAG is built."""
    from xffl_airflow.federation.config import ConfigError
    from xffl_airflow.federation.names import dag_id_for

    seen: dict[str, str] = {}
    for path in config_paths:
        dag_id = dag_id_for(load_config(path).campaign)
        if dag_id in seen:
            raise ConfigError(
                f"{path}: campaign makes DAG {dag_id}, as {seen[dag_id]} does; each federation needs a "
                "campaign of its own (its DAG, its campaigns and its folders at the facilities)"
            )
        seen[dag_id] = path
    return [build_federation_dag(path) for path in config_paths]
