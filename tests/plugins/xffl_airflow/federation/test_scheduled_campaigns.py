"""Scheduled campaigns, live: a config with a cron schedule and 3-round campaigns yields two
scheduled campaigns one after the other (never interleaved round by round); the second
warm-starts from the first's final global model and its round-0 manifest records the source
campaign, round and the source manifest's sha256, which ``python -m xffl_tasks.verify``
follows across campaigns. A downstream DAG scheduled on the config's global-model asset runs
once per finished round. The round runs carry a note naming campaign and round, and the train
log carries no raw trigger event.

Releases (docs/release.md), with approval on and a margin of 10 nats: in round 2 both
facilities return models with noise added (a wrapper around the facility's Python), so each
campaign's last global model is worse than round 1's. The first campaign's release run asks
for approval, the test approves through the REST API's human-in-the-loop endpoint, and round
1's model is released: the card and release.json say round 1 and why, and verify passes. The
second campaign, warm-started, does not beat that release by the margin: its release run
releases nothing and its log says why.

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
import yaml

from tests.plugins.xffl_airflow.federation.campaign_support import ti_states
from xffl_tasks.manifest import sha256_file
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import (
    LocalFacility,
    answer_release_approval,
    install_federation_dag,
    wait_for_release,
    write_config,
)

pytestmark = pytest.mark.slow

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


ROUNDS, MARGIN = 3, 10.0
WRAPPER = """#!/bin/bash
# runs the facility's Python; in round 2 the trained model gets noise (a worse last round)
real={real}
"$real" "$@" || exit $?
case " $* " in *" -m xffl_tasks.train "*) ;; *) exit 0 ;; esac
out="" prev=""
for arg in "$@"; do [ "$prev" = "--out" ] && out="$arg"; prev="$arg"; done
case "$out" in *round-0002*) ;; *) exit 0 ;; esac
exec "$real" - "$out" <<'PY'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
generator = torch.Generator().manual_seed(2)
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    tensors = {{name: t + 0.5 * torch.randn(t.shape, generator=generator).to(t.dtype) for name, t in load_file(str(path)).items()}}
    save_file(tensors, str(path), metadata={{"format": "pt"}})
PY
"""


def install_wrapper(facility) -> str:
    path = Path(facility.home) / "noisy-round-2-python"
    path.write_text(WRAPPER.format(real=facility.python))
    subprocess.run(["chown", f"{facility.user}:{facility.user}", str(path)], check=True)
    path.chmod(0o755)
    return str(path)


def _scheduled_campaigns(storage: Path) -> list[Path]:
    return sorted(p for p in storage.glob("sched-*") if p.is_dir())


def _finished(campaign: Path) -> bool:
    manifest = campaign / f"round-{ROUNDS - 1:04d}" / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["decision"]["stop"]


def test_two_scheduled_campaigns_chain_warm_start_and_emit_asset_events(airflow_instance, testbed, corpora, tiny, storage):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    storage = storage / "scheduled"
    out = storage.parent / "downstream-events"
    out.mkdir(parents=True)
    # the first run comes at the first parse (yesterday's time); the second at `when` today
    when = datetime.now(UTC) + timedelta(minutes=5)
    config = write_config(
        storage / "sched.yaml", campaign="sched", storage=storage, base_model=tiny / "model", python=site1.python,
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
        training={"max_steps": 4, "learning_rate": 0.003, "threads": 1, "seed": 0},
        convergence={"max_rounds": ROUNDS}, schedule=f"{when.minute} {when.hour} * * *", warm_start=True,
        release={"approval": True, "min_improvement": MARGIN},
    )  # fmt: skip
    document = yaml.safe_load(config.read_text())
    for entry, facility in zip(document["facilities"], (site1, site2), strict=True):
        entry["python"] = install_wrapper(facility)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    downstream = airflow.dags_folder / "xffl_sched_downstream.py"
    downstream.write_text(DOWNSTREAM.format(config=str(config), out=str(out)))
    dag_file = None
    try:
        airflow.wait_for_dag("xffl_sched_downstream", timeout=180)
        dag_file = install_federation_dag(airflow.dags_folder, config, name="sched")
        airflow.wait_for_dag("xffl_sched", timeout=180)
        deadline, asked = time.monotonic() + 1500, None
        while time.monotonic() < deadline:
            runs = airflow.dag_runs("xffl_sched")
            assert not [r for r in runs if r["state"] == "failed"], runs
            campaigns = _scheduled_campaigns(storage)
            if asked is None and campaigns and _finished(campaigns[0]):
                # the first campaign's release run asks a person: approve it through the REST API
                asked = answer_release_approval(airflow, "sched", campaigns[0].name, "Approve", timeout=600)
            if len(campaigns) >= 2 and all(_finished(c) for c in campaigns):
                break
            time.sleep(2)
        else:
            raise AirflowError(f"two scheduled campaigns did not finish: {airflow.dag_runs('xffl_sched')}")
        releases = [wait_for_release(airflow, "sched", c.name, timeout=600) for c in campaigns]
        time.sleep(10)  # the last round's downstream run
        runs = sorted(airflow.dag_runs("xffl_sched"), key=lambda r: r["start_date"])
    finally:
        airflow.api("PATCH", "dags/xffl_sched", json={"is_paused": True})
        for path, dag_id in ((dag_file, "xffl_sched"), (downstream, "xffl_sched_downstream")):
            if path is not None:
                airflow.remove_dag_file(path, dag_id)

    first, second = _scheduled_campaigns(storage)
    assert first.name < second.name  # named after the schedule's dates
    # one after the other: rounds 0, 1 and 2 of the first, then those of the second
    assert [r["state"] for r in runs] == ["success"] * 2 * ROUNDS, runs
    assert [r["run_type"] for r in runs] == ["scheduled", "operator_triggered", "operator_triggered"] * 2, runs
    assert runs[1]["dag_run_id"] == f"xffl__{first.name}__round-0001"
    assert runs[ROUNDS + 2]["dag_run_id"] == f"xffl__{second.name}__round-0002"
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["end_date"] <= later["start_date"], (earlier, later)
    # the next round's note names campaign and round, and links the run it continues
    note = airflow.dag_run("xffl_sched", runs[1]["dag_run_id"])["note"]
    assert f"Campaign **{first.name}**, round 1" in note and runs[0]["dag_run_id"] in note, note

    # the second campaign warm-started from the first's final model, and says so
    source_manifest = first / "round-0002" / "manifest.json"
    round0 = json.loads((second / "round-0000" / "manifest.json").read_text())
    assert round0["warm_start"]["campaign"] == first.name and round0["warm_start"]["round"] == 2
    assert round0["warm_start"]["finished"] is True
    assert round0["warm_start"]["manifest_sha256"] == sha256_file(source_manifest)
    assert round0["previous_manifest_sha256"] == sha256_file(source_manifest)
    assert round0["inputs"]["model"] == str(first / "round-0002" / "global")
    first_round0 = json.loads((first / "round-0000" / "manifest.json").read_text())
    assert "warm_start" not in first_round0 and first_round0["previous_manifest"] is None
    verify = [sys.executable, "-m", "xffl_tasks.verify", str(second)]
    checked = subprocess.run(verify, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert f"warm-started from {first.name} round 2" in checked.stdout
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
    assert [e.name for e in events] == [f"{c.name}.{n}.json" for c in (first, second) for n in range(ROUNDS)]
    extra = json.loads((out / f"{second.name}.2.json").read_text())
    assert extra["path"] == str(second / "round-0002" / "global")
    assert extra["decision"]["stop"] is True and isinstance(extra["weighted_val_loss"], float)
    assert extra["sha256"] and all(len(h) == 64 for h in extra["sha256"].values())
    downstream_runs = airflow.dag_runs("xffl_sched_downstream")
    assert len(downstream_runs) == 2 * ROUNDS and {r["state"] for r in downstream_runs} == {"success"}, downstream_runs

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

    # the releases: the first campaign's round 1 (its last round is worse), approved through the
    # REST API; the second campaign beat nothing by the margin and released nothing, saying why
    assert [r["state"] for r in releases] == ["success", "success"], releases
    assert asked["subject"] == f"Release campaign {first.name}, round 1's model?", asked
    assert "no previous release" in asked["body"] and "| site1 |" in asked["body"], asked["body"]
    releases_root = storage / "_releases" / "sched"
    [released] = sorted(releases_root.glob("[0-9]*"))
    assert released.name == "1"
    record = json.loads((released / "release.json").read_text())
    assert record["source"]["campaign"] == first.name and record["source"]["round"] == 1, record["source"]
    assert record["record"]["approval"]["chosen_options"] == ["Approve"], record["record"]
    assert record["record"]["approval"]["responded_by"]["name"] == airflow.username
    losses = {n: json.loads((first / f"round-{n:04d}" / "manifest.json").read_text()).get("weighted_val_loss")
              for n in range(1, ROUNDS)}  # round n's manifest: round n-1's global model, before training  # fmt: skip
    assert record["selection"]["round"] == 1 and record["selection"]["loss"] == pytest.approx(losses[2], rel=1e-9), record["selection"]
    card = (released / "README.md").read_text()
    assert f"The global model of round 1 of campaign **{first.name}**" in card and "| 1 (selected) |" in card, card[:3000]
    checked = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(released)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    refused = json.loads((second / "release" / "selection.json").read_text())
    assert refused["release"] is False and f"{MARGIN:g}" in refused["reason"], refused
    log = airflow.task_log("xffl_sched.release", f"xffl_release__{second.name}", "released")
    assert f"nothing is released: {refused['reason']}" in log, log[-3000:]
    assert ti_states(airflow, "xffl_sched.release", f"xffl_release__{second.name}")["publish"]["state"] == "skipped"
