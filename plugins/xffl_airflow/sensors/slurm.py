"""``SlurmJobSensor``: waits for a Slurm job that already exists (submitted elsewhere), by id or
by its name (and tag comment), on the same trigger as the operator."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context

from xffl_airflow.hooks.slurm import SlurmCommandError, SlurmHook
from xffl_airflow.operators.slurm_results import (
    SlurmConfigError,
    SlurmJobError,
    check_event,
    failure_message,
)
from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.report import job_report
from xffl_airflow.slurm.states import Phase, SlurmJob
from xffl_airflow.ssh import FacilityConnectionError
from xffl_airflow.triggers.slurm import SlurmJobTrigger

DEFER_MARGIN = timedelta(minutes=5)


class SlurmJobSensor(BaseSensorOperator):
    """Waits for an existing Slurm job at ``ssh_conn_id`` to end; succeeds only on COMPLETED 0:0.

    Give ``job_id``, or ``job_name`` (the newest of the user's jobs with that name, and with
    ``comment`` when given, e.g. the ``xffl/<dag>/<run>/<task>/<map>`` tag that
    ``SlurmOperator`` puts on its jobs). The job is never cancelled by this sensor.

    :param ssh_conn_id: the facility's Airflow SSH connection.
    :param job_id: the job to wait for. Templated.
    :param job_name: find the job by name instead. Templated.
    :param comment: with ``job_name``, the comment the job must carry. Templated.
    :param poll_interval: longest time between polls (the first are about 1 s apart).
    :param log_tail_lines: last log lines shown when the job fails.
    :param follow_log: stream the job's log into the task log.
    :param deferrable: wait in the triggerer (default); False pokes from a worker.
    :param login: the facility's login environment (``FacilityLogin``: shell lines run before
        every Slurm command, the folder of the Slurm commands). Not templated.

    ``timeout`` (seconds, from ``BaseSensorOperator``) bounds the wait. Returns (XCom) the job
    report, as ``SlurmOperator`` does.
    """

    template_fields: Sequence[str] = ("job_id", "job_name", "comment")

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        job_id: str | int | None = None,
        job_name: str | None = None,
        comment: str | None = None,
        poll_interval: float = 30.0,
        log_tail_lines: int = 50,
        follow_log: bool = True,
        deferrable: bool = True,
        login: FacilityLogin | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        if (job_id is None) == (job_name is None):
            raise SlurmConfigError(f"task {self.task_id}: give exactly one of job_id and job_name")
        self.ssh_conn_id = ssh_conn_id
        self.job_id = None if job_id is None else str(job_id)
        self.job_name = job_name
        self.comment = comment
        self.poll_interval = float(poll_interval)
        self.log_tail_lines = int(log_tail_lines)
        self.follow_log = follow_log
        self.deferrable = deferrable
        if login is not None and not isinstance(login, FacilityLogin):
            raise SlurmConfigError(
                f"task {self.task_id} ({ssh_conn_id}): login must be a FacilityLogin, got {type(login).__name__}"
            )
        self.login = login or FacilityLogin()

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        job, log_path, tz = self._look_up()
        if job is not None and job.phase.final:
            return self._ended(job, log_path, tz)
        timeout = (
            timedelta(seconds=float(self.timeout))
            if self.timeout is not None
            else timedelta(days=7)
        )
        self.defer(
            trigger=SlurmJobTrigger(
                ssh_conn_id=self.ssh_conn_id,
                job_id=self._job_ref,
                log_path=log_path,
                poll_interval=self.poll_interval,
                log_tail_lines=self.log_tail_lines,
                follow_log=self.follow_log,
                timeout_at=(datetime.now(UTC) + timeout).isoformat(),
                cancel_on_kill=False,
                login=self.login.to_dict(),
            ),
            method_name="execute_complete",
            timeout=timeout + DEFER_MARGIN,
        )

    def poke(self, context: Context) -> bool:
        job, log_path, tz = self._look_up()
        if job is None or not job.phase.final:
            return False
        self._ended(job, log_path, tz)
        return True

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return check_event(event, task_id=self.task_id)

    def _look_up(self) -> tuple[SlurmJob | None, str | None, str | None]:
        """The job (None while unknown), its log path, the facility's UTC offset."""
        try:
            with self._hook() as hook:
                if self.job_id is not None:
                    self._job_ref = v.check_job_id(self.job_id)
                else:
                    name = v.check_job_name(self.job_name)
                    comment = (
                        None if self.comment is None else v.check_comment(self.comment)
                    )
                    _, found = hook.find_tagged(name, comment)
                    if not found:
                        raise SlurmJobError(
                            f"task {self.task_id}: no job named {name!r} at {self.ssh_conn_id}"
                        )
                    self._job_ref = found[-1].job_id
                answer = hook.query([self._job_ref])
        except SlurmInputError as error:
            raise SlurmConfigError(f"task {self.task_id} ({self.ssh_conn_id}): {error}") from None
        except (FacilityConnectionError, SlurmCommandError) as error:
            raise SlurmJobError(f"task {self.task_id}: {error}") from None
        job = answer.jobs.get(self._job_ref)
        if job is None and self._job_ref in answer.lost:
            raise SlurmJobError(
                f"task {self.task_id}: job {self._job_ref} is unknown at {self.ssh_conn_id}"
            )
        log_path = job.stdout if job is not None else None
        if log_path is not None:
            try:
                log_path = v.check_path(log_path, "log_path", patterns=True)
            except SlurmInputError:
                log_path = None  # a path we would not quote safely: do not follow it
        return job, log_path, answer.tz

    def _hook(self) -> SlurmHook:
        return SlurmHook(ssh_conn_id=self.ssh_conn_id, login=self.login)

    def _ended(self, job: SlurmJob, log_path: str | None, tz: str | None) -> dict[str, Any]:
        report = job_report(job, conn_id=self.ssh_conn_id, log_path=log_path, tz=tz)
        if job.phase is Phase.SUCCESS:
            return report
        tail: list[str] = []
        if log_path and self.log_tail_lines:
            with self._hook() as hook:
                tail = hook.log_tail(job.job_id, log_path, self.log_tail_lines)
        return check_event({**report, "status": "failed", "message": failure_message({**report, "log_tail": tail}),
                            "log_tail": tail}, task_id=self.task_id)  # fmt: skip
