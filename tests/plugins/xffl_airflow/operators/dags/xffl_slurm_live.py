"""A DAG for the live SlurmOperator test: a job that defers while it runs at ``site1``, and one
whose first try dies right after submitting (a lost worker) and whose retry must re-attach."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag
from airflow.sdk.exceptions import TaskDeferred
from xffl_airflow.operators.slurm import SlurmOperator


class CrashAfterSubmit(SlurmOperator):
    """Fails its first try just after the job was submitted and recorded, as a lost worker would."""

    def execute(self, context):
        if context["ti"].try_number == 1:
            try:
                super().execute(context)
            except TaskDeferred:
                raise RuntimeError("worker lost right after submitting") from None
        return super().execute(context)


@dag(dag_id="xffl_slurm_live", schedule=None, catchup=False, tags=["xffl-test"])
def xffl_slurm_live():
    SlurmOperator(
        task_id="train",
        ssh_conn_id="facility_site1",
        command="echo start-$XFFL_RUN; for i in $(seq 1 {{ params.seconds }}); do echo tick $i; sleep 1; done",
        remote_workdir="xffl/live/{{ dag.dag_id }}",
        env={"XFFL_RUN": "{{ run_id }}"},
        sbatch={"time": "10"},
        poll_interval=5,
        timeout=timedelta(minutes=10),
        params={"seconds": 30},
    )
    CrashAfterSubmit(
        task_id="flaky",
        ssh_conn_id="facility_site1",
        command="echo flaky-ran; sleep 5",
        remote_workdir="xffl/live/flaky",
        poll_interval=5,
        retries=1,
        retry_delay=timedelta(seconds=2),
    )


xffl_slurm_live()
