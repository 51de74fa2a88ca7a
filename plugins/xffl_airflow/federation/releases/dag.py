"""Builds a federation's release DAG: one run per ended campaign (docs/release.md).

    prepare_release -> per facility [push -> evaluate (Slurm, deferred) -> pull] -> select
                    -> released? -> approve (when the plan asks) -> publish

The round DAG triggers it when a campaign's convergence rule stops the campaign (run id
``xffl_release__<campaign>``, conf ``{"campaign": ...}``); it can also be triggered by hand for
an ended campaign. ``prepare_release`` seals the release plan into the campaign's storage;
every later task obeys it and nothing else, as the rounds do (docs/security.md, R10).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import partial

from airflow.sdk import DAG, Param, TaskGroup, task
from airflow.sdk.definitions.context import get_current_context

from xffl_airflow.federation.names import FederationDag, release_dag_id
from xffl_airflow.federation.releases.approval import ReleaseApprovalOperator
from xffl_airflow.federation.releases.assets import release_asset
from xffl_airflow.federation.releases.evaluate import ReleaseEvaluateOperator

DOC = """
### xFFL federation {campaign}: releases

One run per ended campaign (triggered by the round that ended it): every facility evaluates the
campaign's last global model and the federation's last release; the best round's model is
released when it beats the last release by the config's margin{approval}. Releases:
`{root}/{campaign}/<n>/`.
"""


def _in_the_release(federation: FederationDag, step, /, *args):
    from xffl_airflow.federation.dag import _refusals_fail_at_once
    from xffl_airflow.federation.releases.evaluate import release_of

    def run():
        return step(release_of(federation, get_current_context()), *args)

    return _refusals_fail_at_once(run)


def _record_failure(federation: FederationDag, context) -> None:
    from xffl_airflow.federation.errors import FacilityRefused, RoundError
    from xffl_airflow.federation.releases.evaluate import record_failure, release_of

    ti = context["ti"]
    try:
        sealed = release_of(federation, context)
    except RoundError:
        return
    error = context.get("exception")
    refused = isinstance(getattr(error, "__cause__", None), FacilityRefused)
    record_failure(sealed, ti.task_id.split(".", 1)[0], ti.task_id, ti.try_number, error, refused=refused)


def build_release_dag(config, config_path: str, federation: FederationDag, local_retries: dict) -> DAG:
    """The release DAG of ``config`` (a ``FederationConfig`` with a ``release`` section)."""
    names = [f.name for f in config.facilities]
    remote_retries = {
        "retries": config.retry.retries,
        "retry_delay": timedelta(seconds=config.retry.retry_delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=config.retry.max_retry_delay_s),
        "on_failure_callback": partial(_record_failure, federation),
    }
    with DAG(
        dag_id=release_dag_id(config.campaign),
        description=f"xFFL federation {config.campaign}: releases, one run per ended campaign",
        schedule=None,
        start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["xffl", "federated-learning", "release"],
        params={"campaign": Param(config.campaign, type="string", maxLength=64, title="Campaign",
                                  description="the ended campaign whose model may be released")},
        doc_md=DOC.format(campaign=config.campaign, root=config.releases_root,
                          approval=" and a person approves it" if config.release.approval else ""),
    ) as dag:

        @task(**local_retries)
        def prepare_release() -> dict:
            from xffl_airflow.federation.dag import _refusals_fail_at_once
            from xffl_airflow.federation.releases.prepare import prepare_release as prepare
            from xffl_airflow.federation.rounds.context import run_conf

            context = get_current_context()
            sealed = _refusals_fail_at_once(prepare, dag=federation, run_conf=run_conf(context), run=context["run_id"])
            return {"campaign": sealed.plan.campaign, "plan": str(sealed.path), "plan_sha256": sealed.sha256,
                    "previous_release": sealed.plan.previous_release.number if sealed.plan.previous_release else None}

        prepared = prepare_release()
        pulls = []
        for name in names:
            with TaskGroup(group_id=name, tooltip=f"facility {name}: push, evaluate, pull"):

                @task(task_id="push", **remote_retries)
                def push(facility: str = name) -> dict:
                    from xffl_airflow.federation.releases.evaluate import push_step

                    return _in_the_release(federation, push_step, facility)

                evaluate = ReleaseEvaluateOperator(
                    task_id="evaluate", facility=name, federation=federation,
                    ssh_conn_id=config.facility(name).connection_id,
                    timeout=timedelta(hours=config.retry.train_timeout_h), fail_fast_exit_codes=(2,),
                    **remote_retries,
                )  # fmt: skip

                @task(task_id="pull", **remote_retries)
                def pull(facility: str = name) -> dict:
                    from xffl_airflow.federation.releases.evaluate import pull_step

                    return _in_the_release(federation, pull_step, facility)

                pulled = pull()
                prepared >> push() >> evaluate >> pulled
                pulls.append(pulled)

        @task(trigger_rule="all_done", **local_retries)
        def select() -> dict:
            from xffl_airflow.federation.releases.select import select_step

            record = _in_the_release(federation, select_step)
            return {k: record[k] for k in ("release", "reason", "missing")}

        @task.short_circuit(**local_retries)
        def released() -> bool:
            """Goes on only when the decision in storage says release (its log says why not)."""
            import logging

            from xffl_airflow.federation.releases.select import decision

            decided = _in_the_release(federation, decision)
            logging.getLogger(__name__).info("%s: %s", "releasing" if decided.get("release") else "nothing is released",
                                             decided.get("reason"))  # fmt: skip
            return bool(decided.get("release"))

        approve = ReleaseApprovalOperator(task_id="approve", federation=federation)
        releases = release_asset(config)

        @task(outlets=[releases], **local_retries)
        def publish() -> dict:
            from xffl_airflow.federation.releases.publish import publish_step

            context = get_current_context()
            event = _in_the_release(federation, publish_step)
            context["outlet_events"][releases].extra = event
            return event

        pulls >> select() >> released() >> approve >> publish()
    return dag
