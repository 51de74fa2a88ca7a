"""The CeleryExecutor deployment of ``docker/compose.yaml``, run natively: a 3-round campaign
on two Celery workers, one of them killed in the middle of a push.

Starts: a Redis of its own (``xffl_testbed.redis_server``: the broker), a database of its own
on the session's ``postgres``, a latency relay in front of site1's sshd (a 1 MB/s link, so
that pushing the tiny model takes seconds, as a large model does on a real link), and an
Airflow of its own on them (``xffl_testbed.airflow_instance`` with ``executor="celery"``):
api-server, scheduler, dag-processor, triggerer and two Celery workers, with the settings of
``docker/config/airflow.env``; plus the session's ``testbed`` (two local facilities). Kills
one worker (SIGKILL, with its task processes) while it pushes; stops everything else it
started by PID at the end and checks that none of it survived.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from tests.plugins.xffl_airflow.federation.conftest import corpora, tiny  # noqa: F401 (fixtures)
from xffl_testbed.airflow_instance import AirflowInstance
from xffl_testbed.campaign import (
    LocalFacility,
    start_campaign,
    wait_for_campaign,
    write_config,
)
from xffl_testbed.latency_relay import RelayProcess
from xffl_testbed.postgres import sqlalchemy_url
from xffl_testbed.processes import alive, with_descendants
from xffl_testbed.redis_server import RedisServer

pytestmark = pytest.mark.slow

CAMPAIGN = "celery"
DATABASE = "xffl_celery"
LINK_MBPS = 1.0  # site1's link: the 4 MB tiny model takes about 4 s each way
PROGRESS = " MiB ("  # a push's progress line: "push ... -> site1:...: 0.6/3.9 MiB (16%), ..."


@pytest.fixture
def database(postgres):
    """A database of its own on the session's PostgreSQL, owned by its Airflow role."""
    drop = f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE);\n'
    postgres.psql(drop)
    postgres.psql(f'CREATE DATABASE "{DATABASE}" OWNER "{postgres.role}" ENCODING \'UTF8\';\n')
    yield sqlalchemy_url(
        user=postgres.role,
        password=postgres.password,
        host=postgres.host,
        port=postgres.port,
        database=DATABASE,
    )
    postgres.psql(drop)


def started_at(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the PID, it names one process
    even after the PID is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def still_running(started: dict[int, int | None]) -> list[int]:
    return sorted(pid for pid, start in started.items() if alive(pid) and started_at(pid) == start)


def worker_of(airflow: AirflowInstance, pid: int) -> str | None:
    """The Celery worker component whose process tree holds ``pid``."""
    for name, process in airflow.processes.items():
        if name.startswith("celery-worker") and pid in with_descendants([process.pid]):
            return name
    return None


@pytest.mark.timeout(2700)  # about 5 min on an idle 2-core machine; 15 min seen under load
def test_a_campaign_survives_a_celery_worker_killed_during_a_push(
    testbed, database, corpora, tiny, tmp_path  # noqa: F811
):
    site1, site2 = testbed.facilities
    storage = tmp_path / "campaigns"
    started: dict[int, int | None] = {}  # every process this test started (and those below)

    def record(pids) -> None:
        for pid in pids:
            started.setdefault(pid, started_at(pid))

    kill: dict = {}

    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        relay = RelayProcess(
            site1.host, site1.ssh_port, delay=0, rate_mbps=LINK_MBPS, max_seconds=1200
        )
        stack.callback(relay.stop)
        record([redis.pid, relay.pid])
        env = {
            **testbed.airflow_env(),
            # site1 is reached through the relay; its host key is still checked
            f"AIRFLOW_CONN_{site1.conn_id.upper()}": json.dumps(
                {**site1.connection, "port": relay.port}
            ),
            "XFFL_FACILITY_PYTHON": site1.python,
        }
        airflow = AirflowInstance(
            tmp_path / "airflow",
            dags_folder=tmp_path / "dags",
            env=env,
            sql_alchemy_conn=database,
            executor="celery",
            broker_url=redis.url,
            parallelism=8,
            # One slot per worker: the worker running the push holds no other message (late
            # acknowledgement, prefetch 1). A message a killed worker had received but not yet
            # started waits for [scheduler] task_queued_timeout instead (docs/deployment.md).
            worker_concurrency=1,
        )
        (tmp_path / "dags").mkdir()
        stack.callback(airflow.stop)
        airflow.migrate()
        airflow.start(timeout=300)
        assert set(airflow.pids()) == {
            "api-server", "scheduler", "dag-processor", "triggerer", "celery-worker-1", "celery-worker-2",
        }  # fmt: skip
        record(airflow.all_pids())

        config = write_config(
            storage / f"{CAMPAIGN}.yaml", campaign=CAMPAIGN, storage=storage, base_model=tiny / "model",
            python=site1.python, training={**TRAINING, "max_steps": 10}, convergence={"max_rounds": 3},
            facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
        )  # fmt: skip
        dag_id = start_campaign(airflow, config, CAMPAIGN)
        first_round = f"xffl__{CAMPAIGN}__round-0000"

        first_try_log = (
            airflow.home
            / "logs"
            / f"dag_id={dag_id}"
            / f"run_id={first_round}"
            / "task_id=site1.push"
            / "attempt=1.log"
        )

        def kill_the_pushing_worker(runs):
            """Once site1's push of round 0 is sending (its log shows progress), its worker is
            SIGKILLed with every process below it (the task's supervisor and task process)."""
            record(airflow.all_pids())
            if "worker" in kill or not runs or not first_try_log.exists():
                return
            if PROGRESS not in first_try_log.read_text(errors="replace"):
                return
            push = ti_states(airflow, dag_id, first_round).get("site1.push", {})
            if push.get("state") != "running" or not push.get("pid"):
                return
            name = worker_of(airflow, push["pid"])
            assert name, f"the push's task process {push['pid']} is under no Celery worker"
            doomed = with_descendants([airflow.pids()[name]])
            assert push["pid"] in doomed
            airflow.stop_component(name, sig=signal.SIGKILL, grace=5)
            kill.update(worker=name, pids=doomed, task_pid=push["pid"], at=time.time())

        runs = wait_for_campaign(
            airflow, dag_id, CAMPAIGN, storage / CAMPAIGN, timeout=1500, on_poll=kill_the_pushing_worker, poll=0.25
        )  # fmt: skip
        assert kill.get("worker"), "site1's push was never seen sending"
        assert not any(alive(pid) for pid in kill["pids"])
        # the first try was cut in the middle of the transfer
        cut = first_try_log.read_text(errors="replace")
        assert PROGRESS in cut and "bytes sent" not in cut and "Done. Returned value" not in cut

        # the round and the campaign completed
        assert [r["dag_run_id"] for r in runs] == [
            f"xffl__{CAMPAIGN}__round-{n:04d}" for n in range(3)
        ]
        assert [r["state"] for r in runs] == ["success"] * 3, runs

        # the killed try was failed by the scheduler's heartbeat timeout and retried, once, on
        # the other worker; each try records the worker that ran it
        tries = airflow.api(
            "GET", f"dags/{dag_id}/dagRuns/{first_round}/taskInstances/site1.push/tries"
        )
        by_try = {t["try_number"]: t for t in tries["task_instances"]}
        assert sorted(by_try) == [1, 2], by_try
        assert by_try[1]["state"] == "failed" and by_try[2]["state"] == "success"
        killed, other = (
            kill["worker"],
            {"celery-worker-1": "celery-worker-2"}.get(kill["worker"], "celery-worker-1"),
        )
        assert (
            by_try[1]["hostname"].startswith(f"{killed}.") and by_try[1]["pid"] == kill["task_pid"]
        )
        assert by_try[2]["hostname"].startswith(f"{other}."), by_try[2]
        events = airflow.api(
            "GET",
            "eventLogs",
            params={"dag_id": dag_id, "task_id": "site1.push", "event": "heartbeat timeout"},
        )["event_logs"]
        assert [e["run_id"] for e in events] == [first_round], events
        # the retry was queued well within a minute of the kill (timeout 30 s, checked every 5 s)
        retried = airflow.api(
            "GET", f"dags/{dag_id}/dagRuns/{first_round}/taskInstances/site1.push"
        )
        assert retried["try_number"] == 2 and retried["hostname"].startswith(f"{other}.")
        retry_after = _epoch(by_try[2]["start_date"]) - kill["at"]
        print(
            json.dumps(
                {
                    "killed": killed,
                    "retried_on": other,
                    "retry_started_after_kill_s": round(retry_after, 1),
                }
            )
        )
        assert 0 < retry_after < 90, retry_after

        # the manifest chain verifies
        manifests = [
            json.loads((storage / CAMPAIGN / f"round-{n:04d}" / "manifest.json").read_text())
            for n in range(3)
        ]
        assert manifests[-1]["decision"]["stop"] is True
        assert all(m["participants"] == ["site1", "site2"] for m in manifests)
        verify = subprocess.run(
            [sys.executable, "-m", "xffl_tasks.verify", str(storage / CAMPAIGN)],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stderr

    # everything this test started is gone
    assert still_running(started) == []


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
