"""Turning a ``SlurmJobTrigger`` event (or a job found already ended) into the task's result:
the XCom report on success, an exception that tells the user why otherwise.

Shared by ``SlurmOperator`` and ``SlurmJobSensor``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from xffl_airflow.secrets_scrub import scrub_env
from xffl_airflow.slurm.report import REPORT_KEYS


class SlurmJobError(AirflowException):
    """A Slurm job could not be run or watched; the message names the facility and the cause.

    The message may quote values, the job's log tail and what Slurm printed: every run of it
    that comes from an ``${XFFL_*}`` variable is masked (``xffl_airflow.secrets_scrub``;
    docs/security.md, R3).
    """

    def __init__(self, message: object = "", *args: Any):
        super().__init__(scrub_env(str(message)), *args)


class SlurmConfigError(AirflowFailException, SlurmJobError):
    """The task's Slurm settings are invalid (a field is named): retrying will not help."""


class SlurmSubmitRefused(AirflowFailException, SlurmJobError):
    """sbatch refused the job (bad partition, account, limits): retrying will not help."""


class SlurmJobFailed(SlurmJobError):
    """The job ended in a failure state: the message has its state, reason, exit code and log tail."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


class SlurmJobRefusedInput(AirflowFailException, SlurmJobFailed):
    """The job's command exited with a code that says its input is wrong (``fail_fast_exit_codes``):
    retrying will not help, so the task fails without its retries."""


class SlurmJobTimeout(SlurmJobError):
    """The task stopped waiting for the job (its ``timeout`` passed)."""


def report_of(event: dict[str, Any]) -> dict[str, Any]:
    """The XCom report: exactly ``REPORT_KEYS`` (JSON-safe)."""
    return {key: event.get(key) for key in REPORT_KEYS}


def exit_status(exit_code: Any) -> int | None:
    """The command's exit status from Slurm's ``ExitCode`` ("2:0" -> 2); None when it was
    ended by a signal or the code is unknown."""
    status, _, signal = str(exit_code or "").partition(":")
    if not status.isdigit() or (signal and signal != "0"):
        return None
    return int(status)


def check_event(
    event: dict[str, Any] | None, *, task_id: str, fail_fast_exit_codes: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """The event's report on success; raises on anything else (or on a malformed event).

    A failed job whose command exited with one of ``fail_fast_exit_codes`` raises
    ``SlurmJobRefusedInput`` (no retries); any other failure ``SlurmJobFailed`` (retried)."""
    if not isinstance(event, dict):
        raise SlurmJobError(f"task {task_id}: the Slurm trigger sent no event ({event!r})")
    missing = [key for key in ("status", "job_id", "message") if key not in event]
    if missing:
        raise SlurmJobError(
            f"task {task_id}: the Slurm trigger's event lacks {', '.join(missing)}: {event!r}"
        )
    status = event["status"]
    if status == "success":
        return report_of(event)
    if status == "failed":
        code = exit_status(event.get("exit_code"))
        if code is not None and code in fail_fast_exit_codes:
            raise SlurmJobRefusedInput(
                f"{failure_message(event)}\nExit status {code} is one of the task's "
                f"fail_fast_exit_codes (the command refused its input): not retried",
                report_of(event),
            )
        raise SlurmJobFailed(failure_message(event), report_of(event))
    if status == "timeout":
        raise SlurmJobTimeout(event["message"])
    raise SlurmJobError(f"{event['message']} (status {status})")


def failure_message(event: dict[str, Any]) -> str:
    """Facility, job id, state, reason, exit code, log path and the last lines of the log."""
    tail = [str(line) for line in event.get("log_tail") or []]
    text = (
        f"Slurm job {event.get('job_id')} on facility connection {event.get('conn_id')!r} "
        f"(cluster {event.get('cluster') or '?'}) ended {event.get('state')}: "
        f"reason {event.get('reason') or 'none given'}, exit code {event.get('exit_code') or '?'}; "
        f"log {event.get('log_path') or 'unknown'}"
    )
    if tail:
        text += f"; its last {len(tail)} lines:\n" + "\n".join(tail)
    else:
        text += " (empty or unreadable)"
    return text
