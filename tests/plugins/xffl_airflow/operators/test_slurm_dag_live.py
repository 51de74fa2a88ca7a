"""SlurmOperator in a DAG under a real Airflow: the task is deferred (no worker slot) while its
job runs, survives a triggerer restart, streams the job's log into the task log, and ends with
the right XCom; a try that dies right after submitting is retried onto the same job, through
Airflow's own task_state_store; and clearing the succeeded task runs it again in a new job.

Starts: the session's ``airflow_instance`` (api-server, scheduler, dag-processor, triggerer)
and ``testbed`` (``site1``, ``site2``); this test restarts the instance's triggerer once. All
are stopped by the session fixtures, by PID.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from xffl_airflow.slurm.report import REPORT_KEYS

from tests.plugins.xffl_airflow.hooks.slurm_support import tagged_jobs, wait_until

pytestmark = pytest.mark.slow

DAG_FILE = Path(__file__).parent / "dags" / "xffl_slurm_live.py"
DAG_ID = "xffl_slurm_live"


def states(airflow, run_id: str) -> dict[str, dict]:
    return {ti["task_id"]: ti for ti in airflow.task_instances(DAG_ID, run_id)}


def xcom(airflow, run_id: str, task_id: str) -> dict:
    entry = airflow.api(
        "GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    )
    value = entry["value"]
    return json.loads(value) if isinstance(value, str) else value


def test_operator_defers_while_the_job_runs_and_retries_onto_the_same_job(install_dag, testbed):
    site1 = testbed.facility("site1")
    airflow = install_dag(DAG_FILE, DAG_ID)
    run_id = airflow.trigger(DAG_ID)
    comment = f"xffl/{DAG_ID}/{run_id}/train/-1"

    # while the job runs at the facility, the task is deferred: it holds no worker slot
    def deferred_while_running():
        train = states(airflow, run_id)["train"]
        jobs = tagged_jobs(site1, comment)
        if train["state"] == "deferred" and jobs:
            out = site1.ssh(f"scontrol show -o job {jobs[0]}").stdout
            return "JobState=RUNNING" in out and jobs[0]
        return None

    job_id = wait_until(
        deferred_while_running, timeout=180, every=1, what="train deferred with its job running"
    )

    # a triggerer restart mid-job: the trigger is rebuilt from serialize() and carries on
    airflow.stop_component("triggerer")
    time.sleep(2)
    assert states(airflow, run_id)["train"]["state"] == "deferred"
    airflow.start_component("triggerer")

    assert airflow.wait_for_run(DAG_ID, run_id, timeout=420) == "success"
    tis = states(airflow, run_id)
    assert tis["train"]["state"] == "success" and tis["train"]["try_number"] == 1

    report = xcom(airflow, run_id, "train")
    assert tuple(report) == REPORT_KEYS
    assert (report["job_id"], report["state"], report["exit_code"], report["cluster"]) == (
        job_id, "COMPLETED", "0:0", "site1",
    )  # fmt: skip
    assert report["run_s"] >= 30 and report["log_path"].endswith(
        f"/xffl/live/{DAG_ID}/{DAG_ID}.train-{job_id}.log"
    )
    assert tagged_jobs(site1, comment) == [job_id]

    log = airflow.task_log(DAG_ID, run_id, "train")
    assert f"[job {job_id}] start-{run_id}" in log, log[-3000:]
    assert f"[job {job_id}] tick 30" in log

    # the flaky task: try 1 submitted and died; try 2 re-attached to that very job
    assert tis["flaky"]["state"] == "success" and tis["flaky"]["try_number"] == 2
    first_try = airflow.task_log(DAG_ID, run_id, "flaky", try_number=1)
    submitted = re.search(r"Submitted Slurm job (\d+)", first_try)
    assert submitted and "Task failed with exception" in first_try, first_try[-3000:]
    second_try = airflow.task_log(DAG_ID, run_id, "flaky", try_number=2)
    assert f"Re-attaching to Slurm job {submitted.group(1)}" in second_try, second_try[-3000:]
    assert xcom(airflow, run_id, "flaky")["job_id"] == submitted.group(1)
    assert tagged_jobs(site1, f"xffl/{DAG_ID}/{run_id}/flaky/-1") == [submitted.group(1)]

    # cleared in the UI after it succeeded: the task runs its command again, in a new job
    airflow.api(
        "POST",
        f"dags/{DAG_ID}/clearTaskInstances",
        json={"dry_run": False, "dag_run_id": run_id, "task_ids": ["flaky"], "only_failed": False,
              "reset_dag_runs": True},
    )  # fmt: skip
    wait_until(
        lambda: states(airflow, run_id)["flaky"]["try_number"] == 3, timeout=60, what="flaky cleared"
    )
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
    again = xcom(airflow, run_id, "flaky")
    assert again["state"] == "COMPLETED" and again["job_id"] != submitted.group(1)
    third_try = airflow.task_log(DAG_ID, run_id, "flaky", try_number=3)
    assert "succeeded and was reported: submitting anew" in third_try, third_try[-3000:]
    jobs = sorted(tagged_jobs(site1, f"xffl/{DAG_ID}/{run_id}/flaky/-1"), key=int)
    assert jobs == [submitted.group(1), again["job_id"]]
