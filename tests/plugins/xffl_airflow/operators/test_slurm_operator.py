"""SlurmOperator against real Slurm behind real sshd: every way a job ends, exactly-once
submission, and bad input.

Starts: nothing of its own; uses the session's ``testbed`` (facilities ``site1`` and ``site2``:
slurmctld, slurmd and sshd each, started and stopped by the session fixture). Each test runs
the operator in this process the way Airflow does (execute, the trigger in an event loop,
execute_complete) and cancels any job of its own that is left when it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException
from xffl_airflow.hooks.slurm import remote_command_count
from xffl_airflow.operators.slurm import STATE_KEY, SlurmOperator
from xffl_airflow.operators.slurm_results import (
    SlurmConfigError,
    SlurmJobError,
    SlurmJobFailed,
    SlurmJobRefusedInput,
    SlurmSubmitRefused,
)
from xffl_airflow.slurm.report import REPORT_KEYS

from tests.plugins.xffl_airflow.hooks.slurm_support import (
    MemoryStateStore,
    capture_logs,
    defer,
    facility_of_tests,
    first_event,
    job_state,
    run_task,
    tagged_jobs,
    task_context,
    wait_until,
)

DAG_ID = "slurm_tests"


@pytest.fixture
def site1(testbed, monkeypatch):
    # afterwards, whatever job of these tests is still queued or running is cancelled
    yield from facility_of_tests(testbed, monkeypatch, "site1", lambda comment: f"xffl/{DAG_ID}/" in comment)


def operator(task_id: str, facility, command, **kwargs) -> SlurmOperator:
    kwargs.setdefault("poll_interval", 5)
    return SlurmOperator(
        task_id=task_id,
        ssh_conn_id=facility.conn_id,
        command=command,
        remote_workdir=kwargs.pop("remote_workdir", "xffl/slurm-tests"),
        **kwargs,
    )


def context(task_id: str, request, store: MemoryStateStore | None = None) -> dict:
    # a run id per test (and per pytest run), so tags never meet an earlier run's jobs
    run_id = f"manual__{request.node.name[:60]}-{os.getpid()}-{int(time.time())}"
    return task_context(
        task_id, dag_id=DAG_ID, run_id=run_id.replace("[", "_").replace("]", "_"), store=store
    )


def context_of(ctx: dict) -> dict:
    """The same task instance, with no task_state_store."""
    return {key: value for key, value in ctx.items() if key != "task_state_store"}


def test_completed_job_reports_to_xcom_and_streams_its_log(site1, request):
    op = operator(
        "completes",
        site1,
        "echo hello-from-slurm; sleep 2; echo line-two",
        env={"GREETING": "hi there"},
    )
    with capture_logs() as logs:
        report = run_task(op, context("completes", request))
    assert tuple(report) == REPORT_KEYS
    json.dumps(report)  # JSON-safe
    assert (report["state"], report["exit_code"], report["conn_id"]) == (
        "COMPLETED",
        "0:0",
        site1.conn_id,
    )
    assert report["cluster"] == "site1" and report["job_id"].isdigit()
    assert (
        report["log_path"]
        == f"{site1.workdir}/slurm-tests/{DAG_ID}.completes-{report['job_id']}.log"
    )
    assert report["run_s"] >= 2 and report["elapsed_s"] >= report["run_s"]
    assert (
        report["submit_time"][19:] in ("+00:00",) or report["submit_time"][19] in "+-"
    )  # ISO with offset
    log_text = Path(report["log_path"]).read_text()
    assert log_text == "hello-from-slurm\nline-two\n"
    # the job's own lines reached the task log (the trigger's log), in order
    streamed = logs.containing(f"[job {report['job_id']}]")
    assert streamed == [
        f"[job {report['job_id']}] hello-from-slurm",
        f"[job {report['job_id']}] line-two",
    ]
    # the batch script was written where the job ran
    script = Path(f"{site1.workdir}/slurm-tests/{DAG_ID}.completes.sbatch").read_text()
    assert "export GREETING='hi there'" in script and f"--comment=xffl/{DAG_ID}/" in script


def test_failed_job_raises_with_exit_code_and_log_tail(site1, request):
    op = operator("fails", site1, "for i in $(seq 1 80); do echo progress $i; done; echo 'boom: bad data' >&2; exit 3",
                  log_tail_lines=5)  # fmt: skip
    with pytest.raises(SlurmJobFailed) as caught:
        run_task(op, context("fails", request))
    message = str(caught.value)
    assert "ended FAILED" in message and "exit code 3:0" in message and "NonZeroExitCode" in message
    assert site1.conn_id in message and "(cluster site1)" in message
    assert message.endswith("progress 77\nprogress 78\nprogress 79\nprogress 80\nboom: bad data")
    assert caught.value.report["exit_code"] == "3:0"


def test_an_exit_status_listed_as_fail_fast_fails_without_retries_and_others_are_retried(site1, request):
    op = operator("refuses", site1, "echo 'error: training.lr must be > 0' >&2; exit 2",
                  fail_fast_exit_codes=[2])  # fmt: skip
    with pytest.raises(SlurmJobRefusedInput) as caught:
        run_task(op, context("refuses", request))
    assert isinstance(caught.value, AirflowFailException)  # Airflow does not retry it
    assert caught.value.report["exit_code"] == "2:0"
    assert "training.lr must be > 0" in str(caught.value) and "not retried" in str(caught.value)
    op = operator("other_exit", site1, "exit 3", fail_fast_exit_codes=[2])
    with pytest.raises(SlurmJobFailed) as caught:
        run_task(op, context("other_exit", request))
    assert not isinstance(caught.value, AirflowFailException)  # retried as usual


@pytest.mark.parametrize("codes", [[0], [256], ["2"], [True]])
def test_fail_fast_exit_codes_must_be_exit_statuses(site1, codes):
    with pytest.raises(SlurmConfigError, match=r"fail_fast_exit_codes must be exit statuses from 1 to 255"):
        operator("bad_codes", site1, "true", fail_fast_exit_codes=codes)


@pytest.mark.slow
def test_job_over_its_time_limit_ends_timeout(site1, request):
    op = operator("times_out", site1, "echo start; sleep 300", sbatch={"time": "0:01"})
    started = time.monotonic()
    with pytest.raises(SlurmJobFailed) as caught:
        run_task(op, context("times_out", request), timeout=240)
    assert caught.value.report["state"] == "TIMEOUT"
    assert "reason TimeLimit" in str(caught.value) and "CANCELLED AT" in str(caught.value)
    assert time.monotonic() - started < 200


def test_job_cancelled_from_outside(site1, request):
    op = operator("cancelled", site1, "echo waiting; sleep 300")
    ctx = context("cancelled", request)
    trigger, _ = defer(op, ctx)
    log = Path(trigger.log_path)
    wait_until(lambda: log.exists() and "waiting" in log.read_text(), what="job script running")
    site1.ssh(f"scancel {trigger.job_id}")
    event = asyncio.run(first_event(trigger))
    assert (event["status"], event["state"]) == ("failed", "CANCELLED")
    with pytest.raises(SlurmJobFailed, match=r"ended CANCELLED.*exit code 0:15"):
        op.execute_complete(ctx, event)


def test_node_failure_under_a_running_job(site1, request):
    op = operator(
        "node_fails", site1, "echo on-node; sleep 300", sbatch={"extra": ["--no-requeue"]}
    )
    ctx = context("node_fails", request)
    trigger, _ = defer(op, ctx)
    log = Path(trigger.log_path)
    wait_until(lambda: log.exists() and "on-node" in log.read_text(), what="job script running")
    try:
        site1.slurm_admin("scontrol", "update", "nodename=localhost", "state=down", "reason=test")
        event = asyncio.run(first_event(trigger))
    finally:
        site1.slurm_admin("scontrol", "update", "nodename=localhost", "state=resume", check=False)
    assert (event["status"], event["state"]) == ("failed", "NODE_FAIL")
    with pytest.raises(SlurmJobFailed, match="ended NODE_FAIL"):
        op.execute_complete(ctx, event)
    wait_until(
        lambda: "idle" in site1.slurm_admin("sinfo", "-h", "-o", "%T").stdout, what="node back"
    )


def test_a_job_that_pends_before_it_runs(site1, request):
    # a job holding the whole node first: ours waits for resources, then runs
    site1.ssh(f"cd xffl && sbatch --exclusive --comment=xffl/{DAG_ID}/blocker --wrap 'sleep 6'")
    op = operator("pends", site1, "echo ran", poll_interval=2)
    with capture_logs() as logs:
        report = run_task(op, context("pends", request))
    assert report["state"] == "COMPLETED" and report["queue_wait_s"] >= 3
    states = [line for line in logs.lines if line.startswith(f"Slurm job {report['job_id']} is ")]
    assert states[0].startswith(f"Slurm job {report['job_id']} is PENDING")
    assert states[-1].startswith(f"Slurm job {report['job_id']} is COMPLETED")


def test_execute_twice_yields_one_job_through_the_state_store(site1, request):
    store = MemoryStateStore()
    ctx = context("twice", request, store)
    first_trigger, _ = defer(operator("twice", site1, "echo once; sleep 8"), ctx)
    assert store.get(STATE_KEY)["job_id"] == first_trigger.job_id
    # a retry (a new operator object, as a restarted worker would make) re-attaches
    second_trigger, _ = defer(operator("twice", site1, "echo once; sleep 8"), ctx)
    assert second_trigger.job_id == first_trigger.job_id
    comment = f"xffl/{DAG_ID}/{ctx['ti'].run_id}/twice/-1"
    assert tagged_jobs(site1, comment) == [first_trigger.job_id]
    # and once the job succeeded, a third execute returns its report without submitting
    asyncio.run(first_event(second_trigger))
    report = operator("twice", site1, "echo once; sleep 8").execute(ctx)
    assert (report["job_id"], report["state"]) == (first_trigger.job_id, "COMPLETED")
    assert tagged_jobs(site1, comment) == [first_trigger.job_id]


def test_execute_twice_yields_one_job_through_the_tag_when_the_id_was_not_stored(site1, request):
    ctx = context("tagged", request)  # no task_state_store: the worker died before it was written
    first_trigger, _ = defer(operator("tagged", site1, "sleep 8"), ctx)
    second_trigger, _ = defer(operator("tagged", site1, "sleep 8"), ctx)
    assert second_trigger.job_id == first_trigger.job_id
    assert tagged_jobs(site1, f"xffl/{DAG_ID}/{ctx['ti'].run_id}/tagged/-1") == [
        first_trigger.job_id
    ]


def test_a_cleared_task_whose_job_succeeded_runs_again_in_a_new_job(site1, request):
    # the task succeeded; then the user cleared it in the UI to train again
    store = MemoryStateStore()
    ctx = context("cleared", request, store)
    first = run_task(operator("cleared", site1, "echo first"), ctx)
    assert first["state"] == "COMPLETED"
    stored = store.get(STATE_KEY)
    assert (stored["job_id"], stored["reported"]) == (first["job_id"], True)
    with capture_logs() as logs:
        second = run_task(operator("cleared", site1, "echo second"), ctx)
    assert second["state"] == "COMPLETED" and second["job_id"] != first["job_id"]
    assert any("succeeded and was reported: submitting anew" in line for line in logs.lines)
    comment = f"xffl/{DAG_ID}/{ctx['ti'].run_id}/cleared/-1"
    assert sorted(tagged_jobs(site1, comment), key=int) == [first["job_id"], second["job_id"]]
    # without a store (or with Airflow's clear_on_success), the ended job is not taken up by its tag
    third = run_task(operator("cleared", site1, "echo third"), context_of(ctx))
    assert third["job_id"] not in (first["job_id"], second["job_id"])


def test_a_retry_after_airflow_failed_a_try_that_reported_hands_back_the_same_job(site1, request):
    """Airflow's deferral race under load: the resumed try handed the job's success to XCom and
    was then marked failed ("finished with state success, but the task instance's state
    attribute is running"). Its retry must not train again; a clear afterwards must."""
    store = MemoryStateStore()
    ctx = context("raced", request, store)
    ti = ctx["ti"]
    ti.try_number, ti.max_tries = 1, 2  # retries=2: tries 1 to 3 are one series
    first = run_task(operator("raced", site1, "echo trained", retries=2), ctx)
    assert first["state"] == "COMPLETED"
    assert (store.get(STATE_KEY)["reported"], store.get(STATE_KEY)["reported_try"]) == (True, 1)
    ti.try_number = 2  # the retry Airflow scheduled after failing try 1
    with capture_logs() as logs:
        again = run_task(operator("raced", site1, "echo trained", retries=2), ctx)
    assert (again["job_id"], again["state"]) == (first["job_id"], "COMPLETED")
    assert any(
        f"Job {first['job_id']} succeeded and try 1 reported it" in line
        and "not training again" in line
        for line in logs.lines
    ), logs.lines
    comment = f"xffl/{DAG_ID}/{ti.run_id}/raced/-1"
    assert tagged_jobs(site1, comment) == [first["job_id"]]
    assert store.get(STATE_KEY)["reported_try"] == 2
    # now the user clears the task: Airflow sets max_tries to the try number plus retries
    ti.try_number, ti.max_tries = 3, 2 + 2
    cleared = run_task(operator("raced", site1, "echo trained", retries=2), ctx)
    assert cleared["state"] == "COMPLETED" and cleared["job_id"] != first["job_id"]
    assert sorted(tagged_jobs(site1, comment), key=int) == [first["job_id"], cleared["job_id"]]


def test_a_retry_after_a_failed_job_submits_a_new_one(site1, request):
    store = MemoryStateStore()
    ctx = context("retried", request, store)
    with pytest.raises(SlurmJobFailed):
        run_task(operator("retried", site1, "exit 1"), ctx)
    failed_id = store.get(STATE_KEY)["job_id"]
    report = run_task(operator("retried", site1, "exit 0"), ctx)
    assert report["job_id"] != failed_id and report["state"] == "COMPLETED"
    assert store.get(STATE_KEY)["job_id"] == report["job_id"]


def test_operator_defers_with_a_timeout(site1, request):
    op = operator("deadline", site1, "sleep 1", timeout=timedelta(hours=3))
    trigger, timeout = defer(op, context("deadline", request))
    assert timeout > timedelta(hours=3)
    assert trigger.serialize()[1]["timeout_at"] is not None and trigger.cancel_on_kill


def test_waiting_too_long_cancels_the_job_and_fails(site1, request):
    op = operator("gives_up", site1, "sleep 300", timeout=timedelta(seconds=4))
    ctx = context("gives_up", request)
    trigger, _ = defer(op, ctx)
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "timeout" and "still" in event["message"]
    with pytest.raises(SlurmJobError, match="gave up waiting"):
        op.execute_complete(ctx, event)
    wait_until(
        lambda: job_state(site1, trigger.job_id) in ("CANCELLED", None), what="job cancelled"
    )


# -- bad input ----------------------------------------------------------------------------


def test_an_unsafe_job_name_is_refused_at_parse_time(site1):
    with pytest.raises(
        SlurmConfigError, match=r"job_name: 'x; touch /tmp/pwned' is not a safe job name"
    ):
        operator("bad_name", site1, "true", job_name="x; touch /tmp/pwned")


def test_an_unsafe_templated_name_is_refused_before_any_ssh_call(site1, request, tmp_path):
    op = operator("bad_rendered", site1, "true", job_name="{{ params.name }}")
    op.job_name = "x; touch /tmp/pwned"  # what the template rendered to
    before = remote_command_count()
    with pytest.raises(SlurmConfigError, match="job_name"):
        op.execute(context("bad_rendered", request))
    assert remote_command_count() == before
    assert not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("remote_workdir", "xffl/$(id)", "remote_workdir"),
        ("sbatch", {"partition": "debug; rm -rf ~"}, "sbatch.partition"),
        ("sbatch", {"extra": ["--wrap=id"]}, "sbatch.extra[0]"),
        ("env", {"A B": "x"}, "env"),
    ],
)
def test_unsafe_settings_are_refused_naming_the_field(site1, field, value, words):
    with pytest.raises(SlurmConfigError, match=re.escape(f"({site1.conn_id}): {words}: ")):
        operator("bad_setting", site1, "true", **{field: value})


def test_host_key_mismatch_is_refused(testbed, monkeypatch, request):
    site1, site2 = testbed.facility("site1"), testbed.facility("site2")
    wrong = {**site1.connection, "extra": {**site1.connection["extra"], "host_key": site2.host_key}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{site1.conn_id.upper()}", json.dumps(wrong))
    with pytest.raises(SlurmConfigError, match=rf"{site1.conn_id}.*does not match the pinned key"):
        operator("hostkey", site1, "true").execute(context("hostkey", request))


def test_a_missing_connection_is_named(testbed, monkeypatch, request):
    op = SlurmOperator(
        task_id="noconn", ssh_conn_id="facility_nowhere", command="true", remote_workdir="x"
    )
    with pytest.raises(SlurmConfigError, match="'facility_nowhere': not found"):
        op.execute(context("noconn", request))


def test_an_unreachable_host_is_named_and_retryable(testbed, monkeypatch, request):
    site1 = testbed.facility("site1")
    unreachable = {
        **site1.connection,
        "port": 1,
        "extra": {**site1.connection["extra"], "conn_timeout": 3},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_GONE", json.dumps(unreachable))
    op = SlurmOperator(
        task_id="gone", ssh_conn_id="facility_gone", command="true", remote_workdir="x"
    )
    with pytest.raises(
        SlurmJobError, match=r"'facility_gone': cannot reach .*@127\.0\.0\.1:1"
    ) as caught:
        op.execute(context("gone", request))
    assert not isinstance(caught.value, SlurmConfigError)  # Airflow retries it


def test_sbatch_refusing_a_bad_partition_names_the_facility_and_cause(site1, request):
    op = operator("bad_partition", site1, "true", sbatch={"partition": "nosuchpartition"})
    with pytest.raises(SlurmSubmitRefused) as caught:
        op.execute(context("bad_partition", request))
    assert site1.conn_id in str(caught.value)
    assert "sbatch refused the job" in str(
        caught.value
    ) and "Invalid partition name specified" in str(caught.value)
