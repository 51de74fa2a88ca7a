"""A federation's Slurm job: ``SlurmOperator``, obeying only a plan sealed in storage.

Nothing of what the job runs comes from the DAG's parse or from XCom: at execute time the
operator reads its plan from storage (``job_of``) and takes from it the facility's connection,
login environment, job folder, command and sbatch options (no Jinja is rendered: it has no
templated fields), after the plan's own check of what must have happened before (the push,
under the same plan). The job is tagged with the plan's sha256 in the task's state: a later try
re-attaches only to a job submitted under the same plan (a job of another plan is cancelled).
The job's report is recorded in storage, under the plan, for the steps after it.

Subclasses say where their plan is: ``RoundTrainOperator`` (a round's training) and
``ReleaseEvaluateOperator`` (a campaign's final evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.operators.slurm import SlurmOperator
from xffl_airflow.slurm.login import FacilityLogin

#: What the operator is built with; replaced from the sealed plan before anything runs.
UNSET_COMMAND = ": set from the sealed plan at execute time"
UNSET_WORKDIR = "."


@dataclass(frozen=True)
class SealedJob:
    """One facility's job as its sealed plan says, and how to record its report."""

    where: str
    plan_path: str
    plan_sha256: str
    conn_id: str
    login: FacilityLogin
    command: str
    sbatch: dict[str, Any]
    jobs_dir: str
    #: Raises a ``RoundError`` when what must come first did not happen under the plan.
    check_ready: Callable[[], None]
    record: Callable[[dict[str, Any]], Any]


class SealedJobOperator(SlurmOperator):
    """Runs the job a sealed plan gives for ``facility``.

    :param facility: the facility's name in the federation config.
    :param federation: the DAG's identity (its storage), fixed when the DAG was built.
    :param ssh_conn_id: the facility's connection as the config named it when the DAG was built
        (shown in the UI; the plan's is the one used).
    Other keyword arguments are ``SlurmOperator``'s (timeout, retries, fail_fast_exit_codes).
    """

    template_fields = ()
    ui_color = "#cfe3f7"

    def __init__(self, *, facility: str, federation: FederationDag, ssh_conn_id: str, **kwargs: Any) -> None:
        super().__init__(ssh_conn_id=ssh_conn_id, command=UNSET_COMMAND, remote_workdir=UNSET_WORKDIR, **kwargs)
        self.facility = facility
        self.federation = federation

    def job_of(self, context: Context) -> SealedJob:
        """The facility's job, from the plan sealed for the running task's run."""
        raise NotImplementedError

    def _obey(self, context: Context) -> SealedJob:
        try:
            job = self.job_of(context)
        except RoundError as error:
            raise AirflowFailException(f"{type(error).__name__}: {error}") from None
        self.ssh_conn_id = job.conn_id
        self.login = job.login
        self.command = job.command
        self.sbatch = dict(job.sbatch)
        self.remote_workdir = job.jobs_dir
        self.env = None
        self.job_name = None
        self.job_context = {"plan_sha256": job.plan_sha256}
        self.log.info("%s: obeying the plan %s (sha256 %s)", job.where, job.plan_path, job.plan_sha256)
        return job

    def execute(self, context: Context) -> dict[str, Any]:
        job = self._obey(context)
        try:
            job.check_ready()
        except RoundError as error:
            raise AirflowFailException(f"{type(error).__name__}: {error}") from None
        report = super().execute(context)  # defers while the job waits or runs
        job.record(report)
        return report

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        job = self._obey(context)  # the connection and login, should the job need cancelling
        report = super().execute_complete(context, event)
        job.record(report)
        return report
