"""Slurm job states, what they mean for a waiting task, and one record per job.

Only COMPLETED with exit code 0:0 is success. A state we do not know is UNKNOWN, never failure:
the caller asks again later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum


class Phase(str, Enum):
    WAITING = "waiting"  # queued, held, suspended: not running yet (or not now)
    ACTIVE = "active"  # running or finishing
    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCESS, Phase.FAILURE)


WAITING_STATES = frozenset(
    {
        "PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
        "SPECIAL_EXIT", "SUSPENDED", "STOPPED", "POWER_UP_NODE",
    }
)  # fmt: skip
ACTIVE_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "UPDATE_DB"}
)
FAILURE_STATES = frozenset(
    {
        "FAILED", "BOOT_FAIL", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "DEADLINE", "CANCELLED",
        "REVOKED", "PREEMPTED", "LAUNCH_FAILED", "RECONFIG_FAIL",
    }
)  # fmt: skip
# squeue's compact codes (%t, StateCompact)
COMPACT_STATES = {
    "PD": "PENDING", "CF": "CONFIGURING", "RQ": "REQUEUED", "RH": "REQUEUE_HOLD", "RF": "REQUEUE_FED",
    "RD": "RESV_DEL_HOLD", "SE": "SPECIAL_EXIT", "S": "SUSPENDED", "ST": "STOPPED", "R": "RUNNING",
    "CG": "COMPLETING", "SI": "SIGNALING", "SO": "STAGE_OUT", "RS": "RESIZING", "CD": "COMPLETED",
    "F": "FAILED", "BF": "BOOT_FAIL", "NF": "NODE_FAIL", "OOM": "OUT_OF_MEMORY", "TO": "TIMEOUT",
    "DL": "DEADLINE", "CA": "CANCELLED", "RV": "REVOKED", "PR": "PREEMPTED",
}  # fmt: skip


def normalize_state(raw: str | None) -> str:
    """``"CANCELLED by 0"`` -> ``CANCELLED``; ``"RUNNING+"`` -> ``RUNNING``; ``"CD"`` -> ``COMPLETED``."""
    if not raw or not raw.strip():
        return "UNKNOWN"
    word = raw.strip().split()[0].rstrip("+*").upper()
    return COMPACT_STATES.get(word, word)


def phase_of(state: str, exit_code: str | None) -> Phase:
    state = normalize_state(state)
    if state == "COMPLETED":
        return Phase.SUCCESS if exit_code in (None, "0:0") else Phase.FAILURE
    if state in FAILURE_STATES:
        return Phase.FAILURE
    if state in ACTIVE_STATES:
        return Phase.ACTIVE
    if state in WAITING_STATES:
        return Phase.WAITING
    return Phase.UNKNOWN


def exit_code_from_wait_status(raw: str | int | None) -> str | None:
    """squeue's ``exit_code`` is the wait status (768 = exit 3, 15 = signal 15): as ``"3:0"``, ``"0:15"``."""
    if raw is None or str(raw).strip() in ("", "N/A"):
        return None
    try:
        status = int(str(raw).strip())
    except ValueError:
        return None
    return f"{(status >> 8) & 0xFF}:{status & 0x7F}"


@dataclass(frozen=True)
class SlurmJob:
    """What one Slurm source said about a job. Times are as Slurm prints them (facility local)."""

    job_id: str
    state: str
    exit_code: str | None = None
    reason: str | None = None
    submit_time: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    cluster: str | None = None
    name: str | None = None
    comment: str | None = None
    stdout: str | None = None
    source: str = "squeue"
    raw_id: str | None = None  # the numeric id behind an array task or het component

    @property
    def phase(self) -> Phase:
        return phase_of(self.state, self.exit_code)

    def merged(self, other: SlurmJob | None) -> SlurmJob:
        """This record with its gaps filled from ``other`` (a second source for the same job)."""
        if other is None:
            return self
        gaps = {
            k: getattr(other, k)
            for k in _FILLABLE
            if getattr(self, k) is None and getattr(other, k) is not None
        }
        return replace(self, **gaps) if gaps else self


_FILLABLE = (
    "exit_code",
    "reason",
    "submit_time",
    "start_time",
    "end_time",
    "cluster",
    "name",
    "comment",
    "stdout",
)


def belongs_to(record: SlurmJob, job_id: str) -> bool:
    """Whether ``record`` (``5``, array task ``7_1``, het part ``8+1``) is part of the watched job.

    Watching ``7`` covers every task of array 7 and every component of het job 7; watching
    ``7_1`` covers only that task.
    """
    if job_id in (record.job_id, record.raw_id):
        return True
    if "_" in job_id or "+" in job_id:
        return False
    return record.job_id.startswith(job_id + "_") or record.job_id.startswith(job_id + "+")


_PHASE_RANK = {
    Phase.ACTIVE: 0,
    Phase.WAITING: 1,
    Phase.UNKNOWN: 2,
    Phase.FAILURE: 3,
    Phase.SUCCESS: 4,
}


def aggregate(job_id: str, records: Iterable[SlurmJob]) -> SlurmJob | None:
    """One record for a job made of several (array tasks, het components).

    Any part still waiting or running keeps the whole job so; an unknown part keeps it unknown;
    otherwise the first failed part decides, and only all parts succeeded is success.
    """
    parts = list(records)
    if not parts:
        return None
    if len(parts) == 1:
        return replace(parts[0], job_id=job_id) if parts[0].job_id != job_id else parts[0]
    decisive = min(parts, key=lambda r: _PHASE_RANK[r.phase])
    starts = [r.start_time for r in parts if r.start_time and r.start_time[0].isdigit()]
    ends = [r.end_time for r in parts if r.end_time and r.end_time[0].isdigit()]
    submits = [r.submit_time for r in parts if r.submit_time and r.submit_time[0].isdigit()]
    final = decisive.phase.final
    return replace(
        decisive,
        job_id=job_id,
        submit_time=min(submits) if submits else decisive.submit_time,
        start_time=min(starts) if starts else decisive.start_time,
        end_time=(max(ends) if ends else decisive.end_time) if final else decisive.end_time,
    )
