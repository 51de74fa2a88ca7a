"""Turning a ``SlurmJobTrigger`` event (or a job found already ended) into the task's result:
the XCom report on success, an exception that tells the user why otherwise.

Shared by ``SlurmOperator`` and ``SlurmJobSensor``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from xffl_airflow.slurm.report import REPORT_KEYS


class SlurmJobError(AirflowException):
    """A Slurm job could not be run or watched; the message names the facility and the cause."""


class SlurmConfigError(AirflowFailException, SlurmJobError):
    """The task's Slurm settings are invalid (a field is named): retrying will not help."""


class SlurmSubmitRefused(AirflowFailException, SlurmJobError):
    """sbatch refused the job (bad partition, account, limits): retrying will not help."""


class SlurmJobFailed(SlurmJobError):
    """The job ended in a failure state: the message has its state, reason, exit code and log tail."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


class SlurmJobTimeout(SlurmJobError):
    """The task stopped waiting for the job (its ``timeout`` passed)."""


def report_of(event: dict[str, Any]) -> dict[str, Any]:
    """The XCom report: exactly ``REPORT_KEYS`` (JSON-safe)."""
    return {key: event.get(key) for key in REPORT_KEYS}


def check_event(event: dict[str, Any] | None, *, task_id: str) -> dict[str, Any]:
    """The event's report on success; raises on anything else (or on a malformed event)."""
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
