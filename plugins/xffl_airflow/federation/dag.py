"""Builds the federation DAG of one config file: one run is one round of one campaign.

    prepare -> per facility [push -> train (Slurm, deferred) -> pull] -> aggregate -> finalize
            -> continue? -> next round (TriggerDagRunOperator, run id from campaign and round)

Wiring only: what the tasks do is in ``rounds.py``. Building reads and validates the config
and looks up the facilities' connections in Airflow (no torch, no network), so a config that
does not validate, or names a connection Airflow does not have, is an import error of the DAG
file that names the file and the field, and no run can start.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import DAG, Param, TaskGroup, task
from airflow.sdk.definitions.context import get_current_context
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.assets import global_model_asset
from xffl_airflow.federation.config import load_config
from xffl_airflow.federation.connections import refuse_missing_connections
from xffl_airflow.federation.next_round import NextRoundTriggerOperator
from xffl_airflow.operators.slurm import SlurmOperator

DOC = """
### xFFL federation, one round per run

Config: `{config}`; facilities: {facilities}.

Trigger with `campaign` and `round` (0 starts a campaign); the run of round N+1 is triggered by
round N unless the campaign converged. Retries of a facility's push, train and pull are
automatic; a facility that still fails is left out of the round if the quorum allows.

A run may change only the settings the config opens (shown in the form, the config's values
pre-filled): {knobs}. Commands, paths, connections, sbatch options and storage are the config
file's alone.
"""


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
    from xffl_airflow.federation.config import ConfigError
    from xffl_airflow.federation.knobs import RunConfError
    from xffl_airflow.federation.rounds import RoundError

    try:
        return step(*args, **kwargs)
    except (ConfigError, RunConfError, RoundError) as error:
        raise AirflowFailException(f"{type(error).__name__}: {error}") from error


def _record_failure(context) -> None:
    from xffl_airflow.federation.rounds import record_failure

    ti = context["ti"]
    facility = ti.task_id.split(".", 1)[0]
    plan = ti.xcom_pull(task_ids="prepare")
    record_failure(plan, facility, ti.task_id, ti.try_number, context.get("exception"))


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
    refuse_missing_connections(config, config_path)
    names = [f.name for f in config.facilities]
    remote_retries = {
        "retries": config.retry.retries,
        "retry_delay": timedelta(seconds=config.retry.retry_delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=config.retry.max_retry_delay_s),
        "on_failure_callback": _record_failure,
    }
    with DAG(
        dag_id=f"xffl_{config.campaign.replace('-', '_')}",
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
        ),  # fmt: skip
    ) as dag:

        # a short circuit: a new campaign's round 0 while another campaign of this config is in
        # flight returns no plan, and the whole run is skipped (rounds.prepare_round says why)
        @task.short_circuit(**LOCAL_RETRIES)
        def prepare() -> dict | None:
            from xffl_airflow.federation.rounds import prepare_round

            context = get_current_context()
            params, dag_run = context["params"], context["dag_run"]
            # every key the run was given (the form's fields and anything else in its conf):
            # what the config did not open is refused by name before any facility work
            run_conf = {**dict(params), **dict(dag_run.conf or {})}
            return _refusals_fail_at_once(
                prepare_round,
                config_path=config_path,
                dag_id=dag.dag_id,
                dag_facilities=names,
                run_conf=run_conf,
                run_type=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
                logical_date=context.get("logical_date"),
                active_runs=lambda run_ids: context["ti"].get_dr_count(
                    dag_id=dag.dag_id, run_ids=run_ids, states=["queued", "running"]
                ),
            )

        plan = prepare()
        pulls = []
        for name in names:
            with TaskGroup(group_id=name, tooltip=f"facility {name}: push, train, pull"):
                plan_of = f"ti.xcom_pull(task_ids='prepare')['facilities']['{name}']"

                @task(task_id="push", **remote_retries)
                def push(plan: dict, facility: str = name) -> dict:
                    from xffl_airflow.federation.rounds import push_global

                    return push_global(plan, facility)

                train = SlurmOperator(
                    task_id="train",
                    ssh_conn_id=config.facility(name).connection_id,
                    command="{{ " + plan_of + "['command'] }}",
                    sbatch="{{ " + plan_of + "['sbatch'] }}",
                    remote_workdir="{{ " + plan_of + "['remote_jobs'] }}",
                    timeout=timedelta(hours=config.retry.train_timeout_h),
                    # xffl_tasks.train exits 2 on a bad config, missing data or a launch
                    # environment that does not add up: a retry would queue again for nothing
                    fail_fast_exit_codes=TRAINING_REFUSED_INPUT,
                    # the facility's login environment: the config author's, fixed here
                    login_preamble=config.facility(name).login_preamble,
                    slurm_bin=config.facility(name).slurm_bin,
                    **remote_retries,
                )

                @task(task_id="pull", **remote_retries)
                def pull(plan: dict, facility: str = name) -> dict:
                    from xffl_airflow.federation.rounds import pull_local

                    return pull_local(plan, facility)

                pushed = push(plan)
                pulled = pull(plan)
                pushed >> train >> pulled
                pulls.append(pulled)

        @task(trigger_rule="all_done", **LOCAL_RETRIES)
        def aggregate() -> dict:
            from xffl_airflow.federation.rounds import aggregate_round

            ti = get_current_context()["ti"]
            pulled = {n: ti.xcom_pull(task_ids=f"{n}.pull") for n in names}
            return _refusals_fail_at_once(aggregate_round, ti.xcom_pull(task_ids="prepare"), pulled)

        global_model = global_model_asset(config)

        # every finished round emits an event of the config's global-model asset (assets.py)
        @task(outlets=[global_model], **LOCAL_RETRIES)
        def finalize(plan: dict, aggregated: dict) -> dict:
            from airflow.utils.helpers import build_airflow_dagrun_url

            from xffl_airflow.federation.rounds import finalize_round

            context = get_current_context()
            ti = context["ti"]
            decision = _refusals_fail_at_once(
                finalize_round,
                plan,
                pushed={n: ti.xcom_pull(task_ids=f"{n}.push") for n in names},
                trained={n: ti.xcom_pull(task_ids=f"{n}.train") for n in names},
                pulled={n: ti.xcom_pull(task_ids=f"{n}.pull") for n in names},
                aggregated=aggregated,
                run_id_value=context["run_id"],
                run_url=lambda run_id: build_airflow_dagrun_url(dag_id=dag.dag_id, run_id=run_id),
            )
            context["outlet_events"][global_model].extra = decision["global_model"]
            return decision

        @task.short_circuit(**LOCAL_RETRIES)
        def continue_campaign(decision: dict) -> bool:
            return not decision["stop"]

        aggregated = aggregate()
        pulls >> aggregated
        decision = finalize(plan, aggregated)
        next_round = NextRoundTriggerOperator(
            task_id="next_round",
            trigger_dag_id=dag.dag_id,
            trigger_run_id="{{ ti.xcom_pull(task_ids='finalize')['next_run_id'] }}",
            conf="{{ ti.xcom_pull(task_ids='finalize')['next_conf'] }}",
            note="{{ ti.xcom_pull(task_ids='finalize')['next_note'] }}",
            skip_when_already_exists=True,
            retries=3,
            retry_delay=timedelta(seconds=10),
        )
        continue_campaign(decision) >> next_round
    return dag

