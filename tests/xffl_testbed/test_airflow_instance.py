"""The Airflow test bed: api-server, scheduler, dag-processor and triggerer really started.

Starts: the session's ``airflow_instance`` (four ``airflow`` processes, the scheduler's
executor preloading the federation's modules) and ``testbed``;
stops them at the end of the session, by PID.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow_live, pytest.mark.slurm]

DAG_FILE = Path(__file__).parent / "dags" / "xffl_smoke.py"


def test_a_dag_defers_and_reaches_a_facility(install_dag, testbed):
    airflow = install_dag(DAG_FILE, "xffl_smoke")
    run_id = airflow.trigger("xffl_smoke")
    assert airflow.wait_for_run("xffl_smoke", run_id, timeout=300) == "success"
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("xffl_smoke", run_id)}
    assert tis["wait"]["state"] == "success" and tis["whoami"]["state"] == "success"
    log = airflow.task_log("xffl_smoke", run_id, "whoami")
    assert "Pushing xcom" in log, log[-2000:]
    xcom = airflow.api("GET", f"dags/xffl_smoke/dagRuns/{run_id}/taskInstances/whoami/xcomEntries/return_value")
    assert testbed.facility("site1").user in str(xcom["value"])


def test_task_processes_start_with_the_federation_modules_loaded(install_dag):
    """The test bed runs the preloading LocalExecutor: the scheduler imported torch and the
    aggregation once, and a task's process (forked from it) finds them already there."""
    from xffl_airflow.executors.preloading import DEFAULT_PRELOAD

    airflow = install_dag(Path(__file__).parent / "dags" / "xffl_preloaded.py", "xffl_preloaded")
    assert f"preloaded {len(DEFAULT_PRELOAD)} module(s)" in airflow.component_log("scheduler")
    run_id = airflow.trigger("xffl_preloaded")
    assert airflow.wait_for_run("xffl_preloaded", run_id, timeout=300) == "success"
    xcom = airflow.api(
        "GET",
        f"dags/xffl_preloaded/dagRuns/{run_id}/taskInstances/modules_at_start/xcomEntries/return_value",
    )
    assert xcom["value"] == {"torch": True, "xffl_tasks.aggregate": True, "asyncssh": True}


def test_components_are_processes_of_ours(airflow_instance):
    pids = airflow_instance.pids()
    assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer"}
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
