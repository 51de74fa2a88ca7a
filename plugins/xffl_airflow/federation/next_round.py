"""Starting the next round: a ``TriggerDagRunOperator`` whose run is due at once.

On SQLite a queued run waits for the next whole second of its ``run_after``; giving the next
round a ``run_after`` slightly in the past lets the scheduler start it as soon as this run
ends (``max_active_runs=1`` keeps it queued until then), and ahead of a scheduled run of a new
campaign that became due meanwhile.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

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
