"""The Airflow test bed: api-server, scheduler, dag-processor and triggerer really started;
and, without starting anything, how an instance is put together from the shared settings
(``docker/config/airflow.env``) for either executor.

Starts (the live tests only): the session's ``airflow_instance`` (four ``airflow`` processes,
the scheduler's executor preloading the federation's modules) and ``testbed``; stops them at
the end of the session, by PID. The Celery variant runs in ``test_celery_campaign.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xffl_testbed.airflow_instance import (
    COMPONENTS,
    EXECUTOR,
    HOSTNAME_CALLABLE,
    LATENCY_SETTINGS,
    AirflowInstance,
    celery_worker_args,
    component_hostname,
)
from xffl_testbed.airflow_settings import SettingsError, load_settings, parse_settings

DAG_FILE = Path(__file__).parent / "dags" / "xffl_smoke.py"
PG = "postgresql+psycopg2://airflow:pw@127.0.0.1:5432/airflow"
def test_a_dag_defers_and_reaches_a_facility(install_dag, testbed):
    airflow = install_dag(DAG_FILE, "xffl_smoke")
    run_id = airflow.trigger("xffl_smoke")
    assert airflow.wait_for_run("xffl_smoke", run_id, timeout=300) == "success"
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("xffl_smoke", run_id)}
    assert tis["wait"]["state"] == "success" and tis["whoami"]["state"] == "success"
    log = airflow.task_log("xffl_smoke", run_id, "whoami")
    assert "Pushing xcom" in log, log[-2000:]
    xcom = airflow.api(
        "GET", f"dags/xffl_smoke/dagRuns/{run_id}/taskInstances/whoami/xcomEntries/return_value"
    )
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


# -- the shared settings file -------------------------------------------------------------------


def test_parse_settings_reads_groups_in_order():
    text = (
        "# a comment\n"
        "# --- group: common ---\n"
        "AIRFLOW__CORE__LOAD_EXAMPLES=False\n"
        "\n"
        "# --- group: celery ---\n"
        "# why\n"
        "AIRFLOW__CELERY__TASK_ACKS_LATE=True\n"
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT=21600\n"
    )
    assert parse_settings(text) == {
        "common": {"AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
        "celery": {
            "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
        },
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A=1\n", "x.env:1: A is outside any `# --- group: NAME ---`"),
        ("# --- group: g ---\nnot a setting\n", "x.env:2: not a KEY=VALUE line: 'not a setting'"),
        ("# --- group: g ---\nA='1'\n", "x.env:2: A: write the value without quotes"),
        (
            "# --- group: g ---\nA=1\n# --- group: h ---\nA=2\n",
            "x.env:4: A is already set on line 2",
        ),
        ("# --- group: g ---\n# --- group: g ---\n", "x.env:2: group 'g' appears twice"),
    ],
)
def test_parse_settings_refuses_naming_file_and_line(text, message):
    with pytest.raises(SettingsError) as error:
        parse_settings(text, source="x.env")
    assert str(error.value) == message


def test_load_settings_names_a_missing_group_and_a_missing_file(tmp_path):
    path = tmp_path / "airflow.env"
    path.write_text("# --- group: common ---\nA=1\n# --- group: latency ---\nB=2\n")
    with pytest.raises(SettingsError, match=r"airflow.env: no group executor, workers, celery"):
        load_settings(path)
    with pytest.raises(
        SettingsError, match=r"nothing.env: the shared Airflow settings file is missing"
    ):
        load_settings(tmp_path / "nothing.env")


def test_latency_settings_are_the_shared_file_s_latency_group():
    assert LATENCY_SETTINGS == {
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "0",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
    }
    assert LATENCY_SETTINGS == load_settings()["latency"]


# -- an instance, put together but not started ---------------------------------------------------


def test_the_embedded_default_keeps_the_local_executor_and_airflow_s_heartbeat_timeout(tmp_path):
    airflow = AirflowInstance(tmp_path / "home", dags_folder=tmp_path / "dags")
    assert airflow.components == COMPONENTS
    assert airflow.env["AIRFLOW__CORE__EXECUTOR"] == EXECUTOR
    assert "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT" not in airflow.env
    assert "AIRFLOW__CELERY__BROKER_URL" not in airflow.env
    assert airflow.env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] == "0.2"
    assert airflow.env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    with pytest.raises(ValueError, match="unknown Airflow component 'celery-worker-1'"):
        airflow.start_component("celery-worker-1")


def test_a_celery_instance_applies_the_shared_file_and_overrides_only_host_settings(tmp_path):
    airflow = AirflowInstance(
        tmp_path / "home",
        dags_folder=tmp_path / "dags",
        sql_alchemy_conn=PG,
        executor="celery",
        broker_url="redis://:secret@127.0.0.1:6390/0",
        worker_concurrency=3,
    )
    assert airflow.components == COMPONENTS + ("celery-worker-1", "celery-worker-2")
    shared = load_settings()
    host_specific = {"AIRFLOW__CELERY__WORKER_CONCURRENCY"}
    for group in ("common", "executor", "latency", "workers", "celery"):
        for key, value in shared[group].items():
            if key not in host_specific:
                assert airflow.env[key] == value, key
    assert airflow.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert airflow.env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "30"
    assert airflow.env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:secret@127.0.0.1:6390/0"
    assert airflow.env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{PG}"
    assert airflow.env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "3"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"executor": "kubernetes"}, "executor must be one of"),
        ({"executor": "celery", "sql_alchemy_conn": PG}, "needs broker_url"),
        ({"executor": "celery", "broker_url": "redis://x/0"}, "other than SQLite"),
        (
            {
                "executor": "celery",
                "broker_url": "redis://x/0",
                "sql_alchemy_conn": PG,
                "celery_workers": 0,
            },
            "at least 1",
        ),
    ],
)
def test_an_impossible_executor_choice_is_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AirflowInstance(tmp_path / "home", dags_folder=tmp_path / "dags", **kwargs)


def test_celery_worker_args_give_each_worker_its_own_node_name_and_pid_file():
    assert celery_worker_args("celery-worker-2", concurrency=2, pid_file=Path("/h/w2.pid")) == [
        "celery", "worker",
        "--celery-hostname", "celery-worker-2@%h",
        "--concurrency", "2",
        "--pid", "/h/w2.pid",
        "--skip-serve-logs",
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip


def test_component_hostname_names_the_worker(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "node7.example.org")
    monkeypatch.delenv("XFFL_AIRFLOW_COMPONENT", raising=False)
    assert component_hostname() == "node7.example.org"
    monkeypatch.setenv("XFFL_AIRFLOW_COMPONENT", "celery-worker-1")
    assert component_hostname() == "celery-worker-1.node7.example.org"
    assert HOSTNAME_CALLABLE == f"{component_hostname.__module__}.{component_hostname.__name__}"
