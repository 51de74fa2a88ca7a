"""What a finished (or watched) job reports: the JSON-safe dict the trigger's event and the
operator's XCom carry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from xffl_airflow.slurm.parsing import tz_offset_seconds
from xffl_airflow.slurm.states import SlurmJob

# The keys of a job report, in the order they are documented (docs/slurm.md).
REPORT_KEYS = (
    "job_id", "cluster", "conn_id", "state", "exit_code", "reason", "submit_time", "start_time",
    "end_time", "queue_wait_s", "run_s", "elapsed_s", "log_path",
)  # fmt: skip


def iso_time(slurm_time: str | None, tz: str | None) -> str | None:
    """Slurm's local ``2026-11-25T20:21:22`` with the facility's offset ``+0100`` -> ISO 8601 with
    that offset; without a known offset the time is returned as Slurm printed it."""
    if not slurm_time:
        return None
    try:
        moment = datetime.fromisoformat(slurm_time)
    except ValueError:
        return None
    offset = tz_offset_seconds(tz)
    if offset is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone(timedelta(seconds=offset)))
    return moment.isoformat()


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    except (ValueError, TypeError):
        return None
    return max(delta.total_seconds(), 0.0)


def job_report(
    job: SlurmJob, *, conn_id: str, log_path: str | None, tz: str | None
) -> dict[str, Any]:
    """The report of ``job``: ids, state, exit code, reason, ISO times and durations.

    ``queue_wait_s`` is submit to start, ``run_s`` start to end, ``elapsed_s`` submit to end
    (None while a time is not known yet).
    """
    submit, start = iso_time(job.submit_time, tz), iso_time(job.start_time, tz)
    end = iso_time(job.end_time, tz) if job.phase.final else None
    return {
        "job_id": job.job_id,
        "cluster": job.cluster,
        "conn_id": conn_id,
        "state": job.state,
        "exit_code": job.exit_code,
        "reason": job.reason,
        "submit_time": submit,
        "start_time": start,
        "end_time": end,
        "queue_wait_s": _seconds_between(submit, start),
        "run_s": _seconds_between(start, end),
        "elapsed_s": _seconds_between(submit, end),
        "log_path": log_path or job.stdout,
    }
