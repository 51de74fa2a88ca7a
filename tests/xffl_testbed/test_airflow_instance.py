"""The Airflow test bed: api-server, scheduler, dag-processor and triggerer really started.

Starts: the session's ``airflow_instance`` (four ``airflow`` processes) and ``testbed``;
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


def test_components_are_processes_of_ours(airflow_instance):
    pids = airflow_instance.pids()
    assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer"}
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
