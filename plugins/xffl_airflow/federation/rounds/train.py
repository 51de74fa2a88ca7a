"""The round's training at one facility: a Slurm job obeying only the round's sealed plan.

At execute time the operator reads the round's plan from storage and takes from it the
facility's connection, login environment, job folder, training command and sbatch options, and
requires that the facility's push succeeded under the same plan (``sealed_job``). The job's
report is recorded in the round's storage for the pull and the manifest.
"""

from __future__ import annotations

from functools import partial

from airflow.sdk import Context

from xffl_airflow.federation.rounds.context import sealed_plan
from xffl_airflow.federation.rounds.store import require_step, write_step
from xffl_airflow.federation.sealed_job import SealedJob, SealedJobOperator


class RoundTrainOperator(SealedJobOperator):
    """Trains the round's global model at ``facility`` in a Slurm job, as the round's plan says."""

    def job_of(self, context: Context) -> SealedJob:
        sealed = sealed_plan(self.federation, context)
        entry = sealed.plan.facility(self.facility)
        return SealedJob(
            where=sealed.where(),
            plan_path=str(sealed.path),
            plan_sha256=sealed.sha256,
            conn_id=entry.conn_id,
            login=entry.login.facility_login,
            command=entry.command,
            sbatch=entry.sbatch,
            jobs_dir=entry.jobs_dir,
            check_ready=partial(require_step, sealed, self.facility, "push", before="train"),
            record=partial(write_step, sealed, self.facility, "train"),
        )
