"""Airflow on a real PostgreSQL metadata database (``xffl_testbed.postgres``).

Starts: a PostgreSQL server of this module (``postgres`` from Debian, as the ``postgres``
system user, on a free loopback port, data under /tmp), a real Airflow instance on it
(api-server, scheduler, dag-processor, triggerer; LocalExecutor) and the session's two local
facilities (``testbed``). ``test_stop_leaves_nothing_running`` starts one more PostgreSQL of its
own. Everything is stopped by PID: Airflow by ``AirflowInstance.stop``, PostgreSQL by
``PostgresServer.stop`` (postmaster and every backend), the facilities by the session.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path

import httpx
import psycopg2
import pytest

from xffl_testbed.postgres import (
    PostgresError,
    PostgresServer,
    find_bin_dir,
    postmaster_pid,
    sqlalchemy_url,
)
from xffl_testbed.processes import alive, owner

SMOKE_DAG = Path(__file__).parent / "dags" / "xffl_smoke.py"

# A task that needs the metadata database (a Variable written through the execution API) while
# the test holds PostgreSQL down during its first try; retries are short.
OUTAGE_DAG_ID = "xffl_pg_outage"
OUTAGE_DAG = '''\
"""One task that writes a Variable; the test stops PostgreSQL while its first try runs."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Variable, dag, task


@dag(
    dag_id="xffl_pg_outage",
    schedule=None,
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(seconds=2)},
    tags=["xffl-test"],
)
def xffl_pg_outage():
    @task
    def record(ti=None) -> str:
        signals = Path(os.environ["XFFL_OUTAGE_SIGNALS"])
        (signals / f"try-{ti.try_number}.started").touch()
        if ti.try_number == 1:
            deadline = time.monotonic() + 300
            while not (signals / "database-stopped").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never stopped the database")
                time.sleep(0.2)
        Variable.set("xffl_outage_probe", f"written by try {ti.try_number}")
        return Variable.get("xffl_outage_probe")

    record()


xffl_pg_outage()
'''


def wait_for(predicate, *, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} not seen after {timeout:.0f} s")


# -- pure helpers ------------------------------------------------------------------------------


def test_find_bin_dir_takes_the_newest_version(tmp_path):
    for version in ("9.6", "13", "15", "notaversion"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "postgres").touch()
    (tmp_path / "16" / "bin").mkdir(parents=True)  # no server binary: a client-only install
    assert find_bin_dir(tmp_path) == tmp_path / "15" / "bin"


def test_find_bin_dir_names_what_to_install(tmp_path):
    with pytest.raises(PostgresError, match="postgresql"):
        find_bin_dir(tmp_path)


def test_sqlalchemy_url_quotes_user_and_password():
    url = sqlalchemy_url(
        user="air flow", password="p@ss:w/rd", host="127.0.0.1", port=5433, database="airflow"
    )
    assert url == "postgresql+psycopg2://air%20flow:p%40ss%3Aw%2Frd@127.0.0.1:5433/airflow"


def test_postmaster_pid_reads_the_first_line(tmp_path):
    assert postmaster_pid(tmp_path) is None
    (tmp_path / "postmaster.pid").write_text("4242\n/tmp/data\n1700000000\n5432\n")
    assert postmaster_pid(tmp_path) == 4242
    (tmp_path / "postmaster.pid").write_text("garbage\n")
    with pytest.raises(PostgresError, match="postmaster.pid"):
        postmaster_pid(tmp_path)


def test_bad_role_name_is_refused():
    with pytest.raises(ValueError, match="role"):
        PostgresServer(role="airflow; DROP")


# -- a real server -----------------------------------------------------------------------------
def test_stop_leaves_nothing_running_and_start_keeps_the_data(starts_postgres):
    with PostgresServer() as pg:
        assert pg.listening()
        # A helper (an autovacuum worker, say) may end between the listing and the look.
        owners = {owner(pid) for pid in pg.descendants()} - {None}
        assert owners == {pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()}
        conn = psycopg2.connect(pg.url.replace("postgresql+psycopg2", "postgresql"))
        with conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE kept (value text); INSERT INTO kept VALUES ('before the stop')"
            )
        # The postmaster, its helpers and the backend serving our connection.
        running = pg.descendants()
        assert len(running) >= 3, running
        port = pg.port

        pg.stop()
        assert not [pid for pid in running if alive(pid)]
        assert not pg.listening()
        assert postmaster_pid(pg.data_dir) is None  # a clean shutdown removes it
        with pytest.raises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")

        pg.start()
        assert pg.port == port
        assert pg.psql("SELECT value FROM kept", database=pg.database).strip() == "before the stop"
        root = pg.root
        last = pg.descendants()
    assert not [pid for pid in last if alive(pid)]
    assert not root.exists()


# The session's `postgres` and `airflow_on_postgres` fixtures (tests/conftest.py) serve here.
def test_airflow_migrates_and_runs_the_smoke_dag_on_postgres(
    airflow_on_postgres, postgres, testbed
):
    airflow = airflow_on_postgres
    assert airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    # `airflow db migrate` made Airflow's tables in PostgreSQL, owned by the Airflow role.
    tables = postgres.psql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner = 'airflow'",
        database=postgres.database,
    ).split()
    assert {"alembic_version", "dag", "dag_run", "task_instance", "connection"} <= set(tables)

    (airflow.dags_folder / SMOKE_DAG.name).write_text(SMOKE_DAG.read_text())
    airflow.wait_for_dag("xffl_smoke", timeout=240)
    run_id = airflow.trigger("xffl_smoke")
    assert airflow.wait_for_run("xffl_smoke", run_id, timeout=300) == "success"
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("xffl_smoke", run_id)}
    assert states == {"wait": "success", "whoami": "success"}
    # The run is in PostgreSQL, not in some SQLite file.
    stored = postgres.psql(
        f"SELECT state FROM dag_run WHERE dag_id = 'xffl_smoke' AND run_id = '{run_id}'",
        database=postgres.database,
    )
    assert stored.strip() == "success"
    xcom = airflow.api(
        "GET", f"dags/xffl_smoke/dagRuns/{run_id}/taskInstances/whoami/xcomEntries/return_value"
    )
    assert testbed.facility("site1").user in str(xcom["value"])


def supervise_until_run_ends(airflow, dag_id: str, run_id: str, *, timeout: float) -> str:
    """Waits for the run's final state while doing what a process supervisor (compose's restart
    policy, systemd) does: an Airflow component that exited, having lost its database, is
    started again. Returns the final state."""
    from xffl_testbed.airflow_instance import AirflowError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for component, process in list(airflow.processes.items()):
            if process.poll() is not None:
                airflow.start_component(component)
        try:
            state = airflow.dag_run(dag_id, run_id)["state"]
        except (AirflowError, httpx.HTTPError):
            state = "unknown"  # the api-server is still reconnecting
        if state in ("success", "failed"):
            return state
        time.sleep(1)
    raise AssertionError(f"run {run_id} of {dag_id} did not end within {timeout:.0f} s")


def raw_task_log(airflow, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """The task log with every structured field (the error details too), as text."""
    answer = airflow.api(
        "GET",
        f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
        params={"full_content": True},
        headers={"Accept": "application/json"},
    )
    return json.dumps(answer)
def test_a_task_fails_while_postgres_is_down_and_its_retry_completes(airflow_on_postgres, postgres):
    airflow = airflow_on_postgres
    signals = Path(airflow.env["XFFL_OUTAGE_SIGNALS"])
    (airflow.dags_folder / f"{OUTAGE_DAG_ID}.py").write_text(OUTAGE_DAG)
    airflow.wait_for_dag(OUTAGE_DAG_ID, timeout=240)
    run_id = airflow.trigger(OUTAGE_DAG_ID)
    wait_for(lambda: (signals / "try-1.started").exists(), timeout=240, what="the first try")

    postgres.stop()
    (signals / "database-stopped").touch()
    # The first try's own log file (the API cannot answer without its database).
    logs = airflow.home / "logs" / f"dag_id={OUTAGE_DAG_ID}"
    first_try_log = wait_for(
        lambda: next(
            (
                p
                for p in logs.glob("run_id=*/task_id=record/attempt=1.log")
                if "Task failed" in p.read_text()
            ),
            None,
        ),
        timeout=180,
        what="the first try failing",
    )
    assert "Database error" in first_try_log.read_text()
    assert not (signals / "try-2.started").exists()

    postgres.start()
    assert supervise_until_run_ends(airflow, OUTAGE_DAG_ID, run_id, timeout=400) == "success"
    (ti,) = airflow.task_instances(OUTAGE_DAG_ID, run_id)
    assert (ti["state"], ti["try_number"]) == ("success", 2)
    assert "Database error" in raw_task_log(airflow, OUTAGE_DAG_ID, run_id, "record", 1)
    assert airflow.api("GET", "variables/xffl_outage_probe")["value"] == "written by try 2"
