"""The end-to-end campaign on a PostgreSQL metadata database, through a database outage.

Starts: the session's ``postgres`` (a PostgreSQL server of its own on a loopback port),
``airflow_on_postgres`` (api-server, scheduler, dag-processor and a separate triggerer on it,
LocalExecutor) and ``testbed`` (two local Slurm facilities behind sshd). Stops PostgreSQL in the
middle of round 1 and starts it again; everything is stopped at the end of the session by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import run_campaign
from xffl_testbed.campaign import wait_for_campaign

pytestmark = pytest.mark.slow


def test_three_round_campaign_on_postgres_resumes_after_a_database_outage(
    airflow_on_postgres, postgres, testbed, corpora, tiny, storage
):
    airflow = airflow_on_postgres
    assert airflow.sql_alchemy_conn.startswith("postgresql+psycopg2://")
    dag_id = run_campaign(airflow, testbed, corpora, tiny, storage, campaign="pg", convergence={"max_rounds": 3})
    outage = {"done": False, "seconds": 0.0}

    def database_outage(runs):
        """Once round 1 runs, PostgreSQL goes away for 20 s while its tasks are in flight."""
        if outage["done"] or not any(r["dag_run_id"].endswith("round-0001") and r["state"] == "running" for r in runs):
            return
        outage["done"] = True
        started = time.monotonic()
        postgres.stop()
        time.sleep(20)
        postgres.start()
        outage["seconds"] = time.monotonic() - started

    runs = wait_for_campaign(
        airflow, dag_id, "pg", storage / "pg", timeout=2400, on_poll=database_outage, supervise=True
    )
    assert outage["done"] and outage["seconds"] >= 20
    assert [r["dag_run_id"] for r in runs] == [f"xffl__pg__round-{n:04d}" for n in range(3)]
    assert [r["state"] for r in runs] == ["success"] * 3, runs
    # nothing of the campaign was lost: every round's manifest, chained, and the rows in PostgreSQL
    manifests = [json.loads((storage / "pg" / f"round-{n:04d}" / "manifest.json").read_text()) for n in range(3)]
    assert manifests[-1]["decision"]["stop"] is True
    assert manifests[-1]["weighted_val_loss"] < manifests[0]["weighted_val_loss"]
    verify = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(storage / "pg")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    stored = postgres.psql(
        f"SELECT run_id, state FROM dag_run WHERE dag_id = '{dag_id}' ORDER BY run_id", database=postgres.database
    )
    assert [line.split("|")[1].strip() for line in stored.strip().splitlines()] == ["success"] * 3
