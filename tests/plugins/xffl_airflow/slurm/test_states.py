"""Slurm states: every documented state mapped; unknown is never failure; arrays and het jobs.

Pure functions only: nothing is started.
"""

from __future__ import annotations

import pytest
from xffl_airflow.slurm.states import (
    Phase,
    SlurmJob,
    aggregate,
    belongs_to,
    exit_code_from_wait_status,
    normalize_state,
    phase_of,
)


@pytest.mark.parametrize(
    "state",
    ["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
     "SUSPENDED", "STOPPED", "PD", "RH"],
)  # fmt: skip
def test_waiting_and_held_states(state):
    assert phase_of(state, None) is Phase.WAITING


@pytest.mark.parametrize(
    "state", ["RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "R", "CG"]
)
def test_active_states(state):
    assert phase_of(state, "0:0") is Phase.ACTIVE


@pytest.mark.parametrize(
    "state",
    ["FAILED", "BOOT_FAIL", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "DEADLINE", "CANCELLED", "REVOKED",
     "PREEMPTED", "CANCELLED by 0", "CANCELLED by 1001", "TO", "NF", "OOM", "F"],
)  # fmt: skip
def test_failure_states(state):
    assert phase_of(state, "0:15") is Phase.FAILURE


def test_only_completed_with_exit_zero_is_success():
    assert phase_of("COMPLETED", "0:0") is Phase.SUCCESS
    assert phase_of("CD", None) is Phase.SUCCESS  # squeue gave no exit code: COMPLETED means 0
    assert phase_of("COMPLETED", "1:0") is Phase.FAILURE
    assert phase_of("COMPLETED", "0:9") is Phase.FAILURE


@pytest.mark.parametrize("state", ["", None, "WEIRD_NEW_STATE", "Unknown", "(null)"])
def test_unknown_states_are_never_failure(state):
    assert phase_of(state, "3:0") is Phase.UNKNOWN
    assert not Phase.UNKNOWN.final


def test_state_normalisation():
    assert normalize_state("CANCELLED by 0") == "CANCELLED"
    assert normalize_state(" running+ ") == "RUNNING"
    assert normalize_state("CD") == "COMPLETED"
    assert normalize_state(None) == "UNKNOWN"


@pytest.mark.parametrize(("raw", "code"), [(0, "0:0"), ("768", "3:0"), ("15", "0:15"), ("9", "0:9"),
                                           ("N/A", None), ("", None), (None, None), ("x", None)])  # fmt: skip
def test_wait_status_to_exit_code(raw, code):
    assert exit_code_from_wait_status(raw) == code


def job(job_id, state, raw=None, exit_code=None, start=None, end=None):
    return SlurmJob(job_id, state, exit_code=exit_code, raw_id=raw, start_time=start, end_time=end)


def test_records_belong_to_arrays_and_het_jobs_by_id():
    array_master = job("7_4", "COMPLETED", raw="7")
    task = job("7_1", "RUNNING", raw="10")
    het = job("8+1", "PENDING", raw="9")
    assert belongs_to(array_master, "7") and belongs_to(task, "7") and belongs_to(het, "8")
    assert belongs_to(task, "7_1") and not belongs_to(array_master, "7_1")
    assert not belongs_to(job("12_3", "RUNNING", raw="40"), "1")
    assert not belongs_to(job("17", "RUNNING", raw="17"), "1")
    assert belongs_to(job("10", "RUNNING", raw="10"), "10")


def test_aggregate_waits_for_every_part_and_fails_on_any():
    done = job("7_1", "COMPLETED", "10", "0:0", "2026-01-01T00:00:05", "2026-01-01T00:00:10")
    running = job("7_2", "RUNNING", "11", "0:0", "2026-01-01T00:00:11")
    failed = job("7_3", "FAILED", "12", "3:0", "2026-01-01T00:00:02", "2026-01-01T00:00:20")
    assert aggregate("7", [done, running]).phase is Phase.ACTIVE
    assert aggregate("7", [done, failed]).state == "FAILED"
    assert aggregate("7", [done, failed]).job_id == "7"
    both_done = aggregate(
        "7",
        [done, job("7_2", "COMPLETED", "11", "0:0", "2026-01-01T00:00:11", "2026-01-01T00:00:30")],
    )
    assert both_done.phase is Phase.SUCCESS
    assert (both_done.start_time, both_done.end_time) == (
        "2026-01-01T00:00:05",
        "2026-01-01T00:00:30",
    )
    assert aggregate("7", [done, job("7_2", "MYSTERY", "11")]).phase is Phase.UNKNOWN
    assert aggregate("7", []) is None


def test_merged_fills_gaps_from_a_second_source():
    from_scontrol = SlurmJob(
        "5", "FAILED", exit_code="3:0", reason="NonZeroExitCode", source="scontrol"
    )
    from_sacct = SlurmJob(
        "5", "FAILED", exit_code="3:0", cluster="site1", reason="other", source="sacct"
    )
    merged = from_scontrol.merged(from_sacct)
    assert (merged.reason, merged.cluster, merged.source) == (
        "NonZeroExitCode",
        "site1",
        "scontrol",
    )
