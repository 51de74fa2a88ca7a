"""Starting the next round: a ``TriggerDagRunOperator`` whose run is due at once.

On SQLite a queued run waits for the next whole second of its ``run_after``; giving the next
round a ``run_after`` slightly in the past lets the scheduler start it as soon as this run
ends (``max_active_runs=1`` keeps it queued until then), and ahead of a scheduled run of a new
campaign that became due meanwhile.

``SealedNextRoundOperator`` is the federation DAG's: the next run's id, conf and note come from
the round's manifest and sealed plan in storage (``rounds.finalize.next_round``), never from
XCom; a round whose manifest says stop triggers nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator


class NextRoundTriggerOperator(TriggerDagRunOperator):
    """Triggers the next round of the campaign with a ``run_after`` one second in the past.

    ``note`` is templated here: the next run's note (campaign, round, a link to this run) is
    what the UI's run list and run header show beside the run's time.
    """

    template_fields = (*TriggerDagRunOperator.template_fields, "note")

    def execute(self, context):
        self.run_after = datetime.now(timezone.utc) - timedelta(seconds=1)
        return super().execute(context)


class SealedNextRoundOperator(NextRoundTriggerOperator):
    """Triggers round N+1 of the running campaign as its manifest and sealed plan say.

    :param federation: the DAG's identity (``names.FederationDag``), fixed when it was built.
    """

    template_fields = ()

    def __init__(self, *, federation: Any, **kwargs: Any) -> None:
        super().__init__(trigger_dag_id=federation.dag_id, skip_when_already_exists=True, **kwargs)
        self.federation = federation

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
        from airflow.utils.helpers import build_airflow_dagrun_url

        from xffl_airflow.federation.errors import RoundError
        from xffl_airflow.federation.rounds.context import sealed_plan
        from xffl_airflow.federation.rounds.finalize import next_round

        try:
            sealed = sealed_plan(self.federation, context)
            request = next_round(sealed, run_url=lambda run: build_airflow_dagrun_url(dag_id=self.federation.dag_id, run_id=run))
        except RoundError as error:
            raise AirflowFailException(f"{type(error).__name__}: {error}") from None
        if request is None:
            raise AirflowSkipException(f"{sealed.where()}: the manifest says the campaign stops")
        self.trigger_run_id = request["run_id"]
        self.conf = request["conf"]
        self.note = request["note"]
        self.log.info("triggering %s with %s", self.trigger_run_id, self.conf)
        return super().execute(context)


class ReleaseTriggerOperator(NextRoundTriggerOperator):
    """Starts the federation's release run for the campaign that just ended (its manifest says
    stop): run id ``xffl_release__<campaign>``, conf ``{"campaign": ...}``, from storage.

    :param federation: the round DAG's identity (``names.FederationDag``).
    """

    template_fields = ()

    def __init__(self, *, federation: Any, **kwargs: Any) -> None:
        from xffl_airflow.federation.names import release_dag_id

        super().__init__(trigger_dag_id=release_dag_id(federation.campaign), skip_when_already_exists=True, **kwargs)
        self.federation = federation

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from xffl_airflow.federation.errors import RoundError
        from xffl_airflow.federation.names import release_run_id
        from xffl_airflow.federation.rounds.context import sealed_plan
        from xffl_airflow.federation.rounds.finalize import round_manifest

        try:
            sealed = sealed_plan(self.federation, context)
            manifest = round_manifest(sealed)
        except RoundError as error:
            raise AirflowFailException(f"{type(error).__name__}: {error}") from None
        if not (manifest.get("decision") or {}).get("stop"):
            raise AirflowSkipException(f"{sealed.where()}: the campaign goes on; no release yet")
        self.trigger_run_id = release_run_id(sealed.plan.campaign)
        self.conf = {"campaign": sealed.plan.campaign}
        self.note = f"Release of campaign **{sealed.plan.campaign}** (ended after round {sealed.plan.round})"
        self.log.info("starting the release run %s", self.trigger_run_id)
        return super().execute(context)
