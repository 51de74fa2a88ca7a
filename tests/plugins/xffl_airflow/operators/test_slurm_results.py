"""Turning a trigger event into the task's result: which failures Airflow retries (pure)."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from xffl_airflow.operators.slurm_results import (
    SlurmJobFailed,
    SlurmJobRefusedInput,
    check_event,
    exit_status,
)

FAILED = {
    "status": "failed", "job_id": "42", "message": "ended FAILED", "conn_id": "facility_a",
    "cluster": "a", "state": "FAILED", "reason": "NonZeroExitCode", "log_path": "/w/j-42.log",
    "log_tail": ["error: data folder /d is empty"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("slurm", "status"),
    [("2:0", 2), ("0:0", 0), ("1:0", 1), ("255:0", 255), ("0:9", None), ("137:9", None),
     (None, None), ("", None), ("garbage", None)],
)  # fmt: skip
def test_exit_status_reads_the_command_status_unless_a_signal_ended_it(slurm, status):
    assert exit_status(slurm) == status


def test_a_listed_exit_status_is_refused_input_and_fails_at_once():
    with pytest.raises(SlurmJobRefusedInput) as caught:
        check_event({**FAILED, "exit_code": "2:0"}, task_id="t", fail_fast_exit_codes=frozenset({2}))
    assert isinstance(caught.value, AirflowFailException) and isinstance(caught.value, SlurmJobFailed)
    message = str(caught.value)
    assert message.startswith("Slurm job 42 on facility connection 'facility_a' (cluster a) ended FAILED")
    assert "error: data folder /d is empty" in message
    assert message.endswith("Exit status 2 is one of the task's fail_fast_exit_codes (the command refused its input): not retried")
    assert caught.value.report["exit_code"] == "2:0"


@pytest.mark.parametrize(("exit_code", "codes"), [("3:0", {2}), ("2:0", set()), ("0:9", {0, 9})])
def test_other_failures_stay_retryable(exit_code, codes):
    with pytest.raises(SlurmJobFailed) as caught:
        check_event({**FAILED, "exit_code": exit_code}, task_id="t", fail_fast_exit_codes=frozenset(codes))
    assert not isinstance(caught.value, AirflowFailException)
