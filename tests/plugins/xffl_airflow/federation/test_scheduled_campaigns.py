"""Scheduled campaigns, live: a config with a cron schedule and 2-round campaigns yields two
scheduled campaigns one after the other (never interleaved round by round); the second
warm-starts from the first's final global model and its round-0 manifest records the source
campaign, round and the source manifest's sha256, which ``python -m xffl_tasks.verify``
follows across campaigns. A downstream DAG scheduled on the config's global-model asset runs
once per finished round. The round runs carry a note naming campaign and round, and the train
log carries no raw trigger event.

Starts: the session's ``testbed`` and ``airflow_instance``; installs two DAG files (the
federation DAG and the downstream one) into its dags folder and removes them at the end.
The schedule fires once at the DAG's first parse (the latest past cron time: catchup is
off) and once more at a time a few minutes ahead: exactly two campaigns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import ti_states
from xffl_tasks.manifest import sha256_file
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import LocalFacility, install_federation_dag, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.airflow_live, pytest.mark.slow]

DOWNSTREAM = '''
import json
from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import DAG, task
from airflow.sdk.definitions.context import get_current_context

from xffl_airflow.federation.assets import global_model_asset
from xffl_airflow.federation.config import load_config

MODEL = global_model_asset(load_config({config!r}))

with DAG("xffl_sched_downstream", schedule=[MODEL], start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
         catchup=False, max_active_runs=1):

    @task
    def record():
        for events in get_current_context()["triggering_asset_events"].values():
            for event in events:
                extra = event.extra
                Path({out!r}, f"{{extra['campaign']}}.{{extra['round']}}.json").write_text(json.dumps(extra))

    record()
'''


def _scheduled_campaigns(storage: Path) -> list[Path]:
    return sorted(p for p in storage.glob("sched-*") if p.is_dir())


def _finished(campaign: Path) -> bool:
    manifest = campaign / "round-0001" / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["decision"]["stop"]


def test_two_scheduled_campaigns_chain_warm_start_and_emit_asset_events(airflow_instance, testbed, corpora, tiny, storage):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    storage = storage / "scheduled"
    out = storage.parent / "downstream-events"
    out.mkdir(parents=True)
    # the first run comes at the first parse (yesterday's time); the second at `when` today
    when = datetime.now(UTC) + timedelta(minutes=3)
    config = write_config(
        storage / "sched.yaml", campaign="sched", storage=storage, base_model=tiny / "model", python=site1.python,
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
        training={"max_steps": 4, "learning_rate": 0.003, "threads": 1, "seed": 0},
        convergence={"max_rounds": 2}, schedule=f"{when.minute} {when.hour} * * *", warm_start=True,
    )  # fmt: skip
    downstream = airflow.dags_folder / "xffl_sched_downstream.py"
    downstream.write_text(DOWNSTREAM.format(config=str(config), out=str(out)))
    dag_file = None
    try:
        airflow.wait_for_dag("xffl_sched_downstream", timeout=180)
        dag_file = install_federation_dag(airflow.dags_folder, config, name="sched")
        airflow.wait_for_dag("xffl_sched", timeout=180)
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            runs = airflow.dag_runs("xffl_sched")
            assert not [r for r in runs if r["state"] == "failed"], runs
            campaigns = _scheduled_campaigns(storage)
            if len(campaigns) >= 2 and all(_finished(c) for c in campaigns):
                break
            time.sleep(2)
        else:
            raise AirflowError(f"two scheduled campaigns did not finish: {airflow.dag_runs('xffl_sched')}")
        time.sleep(15)  # the last round's next_round/short-circuit and the downstream run
        runs = sorted(airflow.dag_runs("xffl_sched"), key=lambda r: r["start_date"])
    finally:
        airflow.api("PATCH", "dags/xffl_sched", json={"is_paused": True})
        for path, dag_id in ((dag_file, "xffl_sched"), (downstream, "xffl_sched_downstream")):
            if path is not None:
                airflow.remove_dag_file(path, dag_id)

    first, second = _scheduled_campaigns(storage)
    assert first.name < second.name  # named after the schedule's dates
    # one after the other: round 0 and 1 of the first, then round 0 and 1 of the second
    assert [r["state"] for r in runs] == ["success"] * 4, runs
    assert [r["run_type"] for r in runs] == ["scheduled", "operator_triggered"] * 2, runs
    assert runs[1]["dag_run_id"] == f"xffl__{first.name}__round-0001"
    assert runs[3]["dag_run_id"] == f"xffl__{second.name}__round-0001"
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["end_date"] <= later["start_date"], (earlier, later)
    # the next round's note names campaign and round, and links the run it continues
    note = airflow.dag_run("xffl_sched", runs[1]["dag_run_id"])["note"]
    assert f"Campaign **{first.name}**, round 1" in note and runs[0]["dag_run_id"] in note, note

    # the second campaign warm-started from the first's final model, and says so
    source_manifest = first / "round-0001" / "manifest.json"
    round0 = json.loads((second / "round-0000" / "manifest.json").read_text())
    assert round0["warm_start"]["campaign"] == first.name and round0["warm_start"]["round"] == 1
    assert round0["warm_start"]["finished"] is True
    assert round0["warm_start"]["manifest_sha256"] == sha256_file(source_manifest)
    assert round0["previous_manifest_sha256"] == sha256_file(source_manifest)
    assert round0["inputs"]["model"] == str(first / "round-0001" / "global")
    first_round0 = json.loads((first / "round-0000" / "manifest.json").read_text())
    assert "warm_start" not in first_round0 and first_round0["previous_manifest"] is None
    verify = [sys.executable, "-m", "xffl_tasks.verify", str(second)]
    checked = subprocess.run(verify, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert f"warm-started from {first.name} round 1" in checked.stdout
    # the audit chain crosses campaigns: a byte changed in the first campaign breaks the second's check
    older = first / "round-0000" / "manifest.json"
    data = bytearray(older.read_bytes())
    data[10] ^= 0x20
    older.write_bytes(bytes(data))
    broken = subprocess.run(verify, capture_output=True, text=True)
    assert broken.returncode == 1 and f"warm-start source {first.name}: round-0001/manifest.json" in broken.stderr
    older.write_bytes(bytes(data[:10]) + bytes([data[10] ^ 0x20]) + bytes(data[11:]))

    # one downstream run per finished round, each event naming campaign, round and files
    events = sorted(out.glob("*.json"))
    assert [e.name for e in events] == [f"{c.name}.{n}.json" for c in (first, second) for n in (0, 1)]
    extra = json.loads((out / f"{second.name}.1.json").read_text())
    assert extra["path"] == str(second / "round-0001" / "global")
    assert extra["decision"]["stop"] is True and isinstance(extra["weighted_val_loss"], float)
    assert extra["sha256"] and all(len(h) == 64 for h in extra["sha256"].values())
    downstream_runs = airflow.dag_runs("xffl_sched_downstream")
    assert len(downstream_runs) == 4 and {r["state"] for r in downstream_runs} == {"success"}, downstream_runs

    # the train log: job lines with one time stamp, no raw event dump, no "(reason None)"
    log = airflow.task_log("xffl_sched", runs[1]["dag_run_id"], "site1.train")
    assert "(reason None)" not in log, log[-3000:]
    folder = airflow.home / "logs" / "dag_id=xffl_sched" / f"run_id={runs[1]['dag_run_id']}" / "task_id=site1.train"
    fired = [json.loads(line) for path in folder.glob("*.trigger.*.log") for line in path.read_text().splitlines()
             if '"Trigger fired event"' in line]  # fmt: skip
    assert fired and all(f["result"].startswith("SlurmJobEvent<success: ") for f in fired), fired
    assert "[job " in log and not any(
        line.split("] ", 1)[-1][:4].isdigit() for line in log.splitlines() if line.startswith("[job ")
    ), log[-3000:]
    assert ti_states(airflow, "xffl_sched", runs[1]["dag_run_id"])["finalize"]["state"] == "success"
