"""The end record a batch script leaves (``script.end_record_path``), read back: how a job
ended where Slurm keeps no account of it. Pure functions, tested on literal records."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone

from xffl_airflow.slurm.commands import MAX_END_RECORD
from xffl_airflow.slurm.parsing import Section, tz_offset_seconds
from xffl_airflow.slurm.states import SlurmJob

# The end record the batch script writes (see ``script``): one line, every field present.
_END_RECORD = re.compile(
    rb"xffl-end 1 job=([0-9]{1,12}) rc=([0-9]{1,3}) signal=(TERM|) start=([0-9]{1,12}) "
    rb"end=([0-9]{1,12}) limit=([0-9]{0,12})\n?"
)
# A TERM this close to the time limit (or later) is the limit's, not a scancel's.
TIME_LIMIT_SLACK = 10


def parse_end_record(data: bytes, *, job_id: str, tz: str | None = None) -> SlurmJob | None:
    """The job's end from its end record; None when the record is not one (too long, any
    deviation from the format, another job's, times out of order): never a guess.

    Exit 0 is COMPLETED; another exit status FAILED with that code; a TERM is TIMEOUT when it
    came at the time limit, CANCELLED otherwise (both with exit code ``0:15``).
    """
    if not isinstance(data, bytes) or len(data) > MAX_END_RECORD:
        return None
    match = _END_RECORD.fullmatch(data)
    if match is None:
        return None
    job, rc, signal, start, end, limit = (g.decode("ascii") for g in match.groups())
    if int(rc) > 255 or int(start) > int(end) or (job_id.isdigit() and job != job_id):
        return None
    if signal:
        timed_out = bool(limit) and int(end) - int(start) >= int(limit) - TIME_LIMIT_SLACK
        state, exit_code = ("TIMEOUT" if timed_out else "CANCELLED"), "0:15"
        reason = "TimeLimit" if timed_out else None
    else:
        state = "COMPLETED" if rc == "0" else "FAILED"
        exit_code, reason = f"{int(rc)}:0", None if rc == "0" else "NonZeroExitCode"
    return SlurmJob(job_id=job_id, state=state, exit_code=exit_code, reason=reason,
                    start_time=_epoch_time(int(start), tz), end_time=_epoch_time(int(end), tz),
                    source="end-record", raw_id=job)  # fmt: skip


def end_record_answer(section: Section | None, *, job_id: str, tz: str | None) -> SlurmJob | None:
    """The job from the ``end`` section (base64 of the record); None when absent or unreadable."""
    if section is None or section.rc != 0:
        return None
    try:
        data = base64.b64decode(section.text.strip(), validate=True)
    except ValueError:
        return None
    return parse_end_record(data, job_id=job_id, tz=tz)


def _epoch_time(seconds: int, tz: str | None) -> str | None:
    """Epoch seconds as Slurm prints times: facility local (``tz``; UTC when unknown)."""
    try:
        zone = timezone(timedelta(seconds=tz_offset_seconds(tz) or 0))
        return datetime.fromtimestamp(seconds, zone).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return None
