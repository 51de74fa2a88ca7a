"""``SlurmJobTrigger``: waits in the triggerer for one Slurm job to end.

Thin by design: its state is its constructor arguments (JSON-safe, returned by
``serialize()``), the polling lives in the facility's shared poller
(``xffl_airflow.hooks.slurm_poller``), and it yields exactly one final event. Rebuilt from
``serialize()`` after a triggerer restart it simply watches the same job id again.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from xffl_airflow.hooks.slurm import SlurmHook
from xffl_airflow.hooks.slurm_poller import JobUpdate, poller_for
from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.report import job_report
from xffl_airflow.slurm.script import end_record_path
from xffl_airflow.slurm.states import Phase, SlurmJob

# A job no source knows for this long is reported as an error (never as failed).
DEFAULT_LOST_AFTER = 600.0
CANCEL_TIMEOUT = 60.0
# A job log line's own leading time stamp (``2026-12-04 15:33:49,649 ``, ISO ``...T...Z``): the
# task log stamps every line already, so the job's own is dropped (the job log keeps it).
_LINE_STAMP = re.compile(
    r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\]?\s+"
)
# The poller's problems end with their try count and delay; what is left says why.
_TRY_SUFFIX = re.compile(r" \(try \d+, again in \d+ s\)$")


class SlurmJobEvent(TriggerEvent):
    """The trigger's one event; its ``repr`` (what the triggerer logs as "Trigger fired event")
    is the event's message, not the whole payload with its log tail."""

    def __repr__(self) -> str:
        payload = self.payload if isinstance(self.payload, dict) else {}
        return f"SlurmJobEvent<{payload.get('status')}: {payload.get('message')}>"


def problem_reason(problem: str) -> str:
    """A poll problem without its try count and delay: two tries that fail alike read alike."""
    return _TRY_SUFFIX.sub("", problem)


def job_log_line(line: str) -> str:
    """A job log line as the task log shows it: without the line's own time stamp."""
    return _LINE_STAMP.sub("", line, count=1)


class SlurmJobTrigger(BaseTrigger):
    """Waits for Slurm job ``job_id`` at the facility ``ssh_conn_id``; streams its log meanwhile.

    The event: ``status`` (success | failed | error | timeout), ``job_id``, ``message``, the job
    report (``cluster``, ``conn_id``, ``state``, ``exit_code``, ``reason``, ISO ``submit_time``,
    ``start_time``, ``end_time``, ``queue_wait_s``, ``run_s``, ``elapsed_s``, ``log_path``),
    ``log_tail`` (the last lines of the log) and ``log_offset`` (bytes of the log shown).

    :param ssh_conn_id: the facility's Airflow SSH connection.
    :param job_id: the Slurm job id (``123``, ``123_4``).
    :param log_path: the job's log at the facility; its new lines go to the task log.
    :param log_offset: bytes of the log already shown.
    :param poll_interval: the longest time between two polls (the first are about 1 s apart).
    :param log_tail_lines: how many last log lines the final event carries.
    :param follow_log: stream the log into the task log while the job runs.
    :param timeout_at: ISO 8601 time after which the trigger gives up (status ``timeout``).
    :param cancel_on_kill: ``scancel`` the job when a user kills the deferred task.
    :param lost_after: seconds a job may stay unknown to squeue, sacct and scontrol before the
        trigger reports an error.
    :param login: the facility's login environment, ``FacilityLogin.to_dict()`` (JSON-safe:
        a trigger's state is its constructor's arguments); validated again when rebuilt.
    :param login_preamble: (read only from trigger rows of earlier versions) the login
        environment's shell lines; ``login`` replaces it.
    :param slurm_bin: (read only from trigger rows of earlier versions); ``login`` replaces it.
    """

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        job_id: str,
        log_path: str | None = None,
        log_offset: int = 0,
        poll_interval: float = 30.0,
        log_tail_lines: int = 50,
        follow_log: bool = True,
        timeout_at: str | None = None,
        cancel_on_kill: bool = False,
        lost_after: float = DEFAULT_LOST_AFTER,
        login: dict[str, Any] | None = None,
        login_preamble: list[str] | None = None,
        slurm_bin: str | None = None,
    ):
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.job_id = v.check_job_id(job_id)
        self.log_path = (
            None if log_path is None else v.check_path(log_path, "log_path", patterns=True)
        )
        self.log_offset = int(log_offset)
        self.poll_interval = float(poll_interval)
        self.log_tail_lines = int(log_tail_lines)
        self.follow_log = bool(follow_log)
        self.timeout_at = timeout_at
        self.cancel_on_kill = bool(cancel_on_kill)
        self.lost_after = float(lost_after)
        if login is None and (login_preamble or slurm_bin):  # a row serialized by an earlier version
            login = {"preamble": list(login_preamble or ()), "slurm_bin": slurm_bin}
        self._login = FacilityLogin.from_dict(login)
        self._deadline = _monotonic_deadline(timeout_at)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "ssh_conn_id": self.ssh_conn_id,
                "job_id": self.job_id,
                "log_path": self.log_path,
                "log_offset": self.log_offset,
                "poll_interval": self.poll_interval,
                "log_tail_lines": self.log_tail_lines,
                "follow_log": self.follow_log,
                "timeout_at": self.timeout_at,
                "cancel_on_kill": self.cancel_on_kill,
                "lost_after": self.lost_after,
                "login": self._login.to_dict(),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            event = await self._wait_for_end()
        except Exception as error:  # an unexpected error is an error event, never a job failure
            self.log.exception("Watching Slurm job %s on %s failed", self.job_id, self.ssh_conn_id)
            event = self._event(
                "error", f"watching the job failed: {type(error).__name__}: {error}"
            )
        yield SlurmJobEvent(event)

    async def _wait_for_end(self) -> dict[str, Any]:
        poller = poller_for(self.ssh_conn_id, login=self._login)
        last: JobUpdate = JobUpdate(log_offset=self.log_offset)
        shown_state: tuple[str, str | None] | None = None
        lost_since: float | None = None
        problems = 0
        reason: str | None = None  # why the last try failed
        accounting: str | None = None  # why sacct could not tell; said once in the task log
        async with poller.watch(self.job_id, log_path=self.log_path, log_offset=self.log_offset,
                                poll_interval=self.poll_interval, follow_log=self.follow_log,
                                tail_lines=self.log_tail_lines) as watch:  # fmt: skip
            self.log.info(
                "Watching Slurm job %s on %s (log %s)", self.job_id, self.ssh_conn_id, self.log_path
            )
            while True:
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(remaining):
                        update = await watch.updates.get()
                except TimeoutError:
                    state = last.job.state if last.job else "in an unknown state"
                    return self._event(
                        "timeout",
                        f"gave up waiting at {self.timeout_at}: the job is still {state}",
                        last,
                    )
                for line in update.log_lines:
                    self.log.info("[job %s] %s", self.job_id, job_log_line(line))
                if update.fatal:
                    return self._event("error", f"cannot reach Slurm: {update.fatal}", last)
                if update.problem:
                    problems += 1
                    # the first, every tenth, and each that fails for another reason than the
                    # last (a dropped link that turns into an expired certificate)
                    said, reason = reason, problem_reason(update.problem)
                    if problems == 1 or problems % 10 == 0 or reason != said:
                        self.log.warning(
                            "Slurm at %s not answering, still waiting: %s",
                            self.ssh_conn_id,
                            update.problem,
                        )
                    continue
                if problems:
                    self.log.info(
                        "Slurm at %s answers again after %s failed tries",
                        self.ssh_conn_id,
                        problems,
                    )
                    problems, reason = 0, None
                update.job = update.job or last.job
                last = update
                if update.accounting and accounting is None:
                    accounting = update.accounting
                    self.log.warning(_accounting_warning(self.job_id, accounting, self.log_path))
                if update.job is not None and (update.job.state, update.job.reason) != shown_state:
                    shown_state = (update.job.state, update.job.reason)
                    self.log.info(
                        "Slurm job %s is %s%s", self.job_id, update.job.state,
                        f" (reason {update.job.reason})" if update.job.reason else "",
                    )  # fmt: skip
                if update.final and update.job is not None:
                    success = update.job.phase is Phase.SUCCESS
                    return self._event(
                        "success" if success else "failed",
                        _ended(update.job, self.ssh_conn_id),
                        update,
                    )
                if update.lost:
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since >= self.lost_after:
                        return self._event(
                            "error",
                            _vanished(self.job_id, self.lost_after, accounting, self.log_path)
                            if update.vanished
                            else f"job {self.job_id} has been unknown to squeue, sacct and "
                            f"scontrol for {self.lost_after:.0f} s: it may have been purged",
                            update,
                        )
                else:
                    lost_since = None

    def _event(self, status: str, message: str, update: JobUpdate | None = None) -> dict[str, Any]:
        job = update.job if update is not None else None
        report = job_report(job or SlurmJob(self.job_id, "UNKNOWN"), conn_id=self.ssh_conn_id,
                            log_path=self.log_path, tz=update.tz if update else None)  # fmt: skip
        if job is None:
            report["state"] = None
        return {
            **report,
            "status": status,
            "job_id": self.job_id,
            "message": f"Slurm job {self.job_id} on {self.ssh_conn_id}: {message}",
            "log_tail": list(update.log_tail) if update is not None else [],
            "log_offset": update.log_offset if update is not None else self.log_offset,
        }

    async def on_kill(self) -> None:
        """A user killed the deferred task (mark failed/success, clear): cancel the job if asked."""
        if not self.cancel_on_kill:
            return
        self.log.info("Cancelling Slurm job %s on %s", self.job_id, self.ssh_conn_id)
        async with SlurmHook(ssh_conn_id=self.ssh_conn_id, login=self._login) as hook:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await hook.acancel(self.job_id)


def _ended(job: SlurmJob, conn_id: str) -> str:
    text = f"ended {job.state}"
    details = [
        f"exit code {job.exit_code}" if job.exit_code else None,
        f"reason {job.reason}" if job.reason else None,
    ]
    details = [d for d in details if d]
    if job.source == "end-record":
        details.append("as its end record says: Slurm had forgotten it")
    return text + (f" ({', '.join(details)})" if details else "")


# What to do when Slurm forgets jobs: said in the task log, and in the error of a vanished job.
_FIX = (
    "to let Slurm remember how jobs end, the site can run slurmdbd "
    "(AccountingStorageType=accounting_storage/slurmdbd), or a job completion log users can "
    "read with `sacct -c` (JobCompType=jobcomp/filetxt), or keep ended jobs longer (MinJobAge)"
)


def _accounting_warning(job_id: str, accounting: str, log_path: str | None) -> str:
    record = end_record_path(log_path)
    return (
        f"Slurm job {job_id} left squeue, and the facility's accounting cannot tell how it "
        f"ended ({accounting}); reading the end record the job wrote "
        f"({record or 'none: the log path is unknown'}) instead. {_FIX[0].upper()}{_FIX[1:]}."
    )


def _vanished(job_id: str, waited: float, accounting: str | None, log_path: str | None) -> str:
    return (
        f"how job {job_id} ended cannot be learned: it left squeue and scontrol (past the "
        f"cluster's MinJobAge), accounting could not be asked "
        f"({accounting or 'sacct failed'}), and it left no readable end record at "
        f"{end_record_path(log_path) or '(unknown log path)'} in {waited:.0f} s (killed before "
        f"it could write one, or the folder is not visible from the login node); {_FIX}"
    )


def _monotonic_deadline(timeout_at: str | None) -> float | None:
    if not timeout_at:
        return None
    moment = datetime.fromisoformat(timeout_at)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return time.monotonic() + (moment - datetime.now(UTC)).total_seconds()
