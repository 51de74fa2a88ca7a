"""A consumer DAG scheduled on a federation's global-model asset, live, acts only on verified
events: a genuine event (a real campaign folder, made with ``write_manifest``, no training)
runs it to success with the verified folder; a forged event created through the REST API
(``POST /api/v2/assets/events``) pointing at a forged folder fails its task, and the task's log
says why.

Starts: the session's ``testbed`` and ``airflow_instance``; installs one DAG file into its dags
folder and removes it at the end (``remove_dag_file``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from xffl_tasks.manifest import hash_tree, write_manifest
from xffl_testbed.airflow_instance import AirflowError

CAMPAIGN = "verifytest"
FEDERATION_DAG = "xffl_verifytest"
CONSUMER = "xffl_verified_consumer"

CONSUMER_DAG = """
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from airflow.sdk import DAG, task, get_current_context

from xffl_airflow.federation.assets import global_model_asset, verify_global_model_event

STORAGE = {storage!r}
MODEL = global_model_asset(SimpleNamespace(campaign={campaign!r}, storage=STORAGE))

with DAG({consumer!r}, schedule=[MODEL], start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
         catchup=False, max_active_runs=1):

    @task(retries=0)
    def consume():
        for events in get_current_context()["triggering_asset_events"].values():
            for event in events:
                model = verify_global_model_event(event.extra, storage=STORAGE, dag_id={dag_id!r})
                Path({out!r}, f"{{model.campaign}}.{{model.round}}.json").write_text(
                    json.dumps({{"path": str(model.path), "sha256": model.sha256}}))

    consume()
"""


def genuine_campaign(storage: Path) -> dict:
    """Round 0 of a campaign of the federation DAG, as ``finalize`` leaves it; its event extra."""
    round_dir = storage / CAMPAIGN / "round-0000"
    (round_dir / "global").mkdir(parents=True)
    (storage / CAMPAIGN / "campaign.json").write_text(json.dumps({"dag_id": FEDERATION_DAG}))
    (round_dir / "global" / "model.safetensors").write_bytes(b"\x01" * 4096)
    (round_dir / "global" / "config.json").write_text("{}\n")
    outputs = {f"global/{k}": v for k, v in hash_tree(round_dir / "global").items()}
    run_id = f"xffl__{CAMPAIGN}__round-0000"
    manifest = write_manifest(round_dir, {"campaign": CAMPAIGN, "round": 0, "dag_id": FEDERATION_DAG,
                                          "run_id": run_id, "outputs": outputs,
                                          "decision": {"stop": True, "reason": "max_rounds"}}, None)  # fmt: skip
    return {"campaign": CAMPAIGN, "round": 0, "run_id": run_id, "path": str(round_dir / "global"),
            "manifest": str(manifest), "sha256": outputs, "decision": {"stop": True}}  # fmt: skip


def run_for_event(
    airflow, asset_id: int, extra: dict, known: set[str], *, timeout: float = 300
) -> tuple[str, str]:
    """Posts an asset event; waits for the consumer run it starts to end: (run id, state)."""
    airflow.api("POST", "assets/events", json={"asset_id": asset_id, "extra": extra})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["dag_run_id"] for r in airflow.dag_runs(CONSUMER) if r["dag_run_id"] not in known]
        if new:
            known.add(new[0])
            return new[0], airflow.wait_for_run(CONSUMER, new[0], timeout=timeout)
        time.sleep(1)
    raise AirflowError(f"no run of {CONSUMER} after an asset event in {timeout:.0f} s")


def test_a_consumer_acts_on_a_genuine_event_and_refuses_a_forged_one(airflow_instance, tmp_path):
    airflow = airflow_instance
    storage, out = tmp_path / "storage", tmp_path / "consumed"
    out.mkdir()
    extra = genuine_campaign(storage)
    forged = tmp_path / "forged" / "global"
    forged.mkdir(parents=True)
    (forged / "model.safetensors").write_bytes(b"evil" * 1024)
    dag_file = airflow.dags_folder / f"{CONSUMER}.py"
    dag_file.write_text(CONSUMER_DAG.format(storage=str(storage), campaign=CAMPAIGN, consumer=CONSUMER,
                                            dag_id=FEDERATION_DAG, out=str(out)))  # fmt: skip
    try:
        airflow.wait_for_dag(CONSUMER, timeout=180, dag_file=dag_file)
        airflow.unpause(CONSUMER)
        assets = airflow.api(
            "GET", "assets", params={"name_pattern": f"xffl_{CAMPAIGN}_global_model"}
        )["assets"]
        asset_id = next(a["id"] for a in assets if a["name"] == f"xffl_{CAMPAIGN}_global_model")
        known = {r["dag_run_id"] for r in airflow.dag_runs(CONSUMER)}

        run, state = run_for_event(airflow, asset_id, extra, known)
        assert state == "success", airflow.task_log(CONSUMER, run, "consume")
        consumed = json.loads((out / f"{CAMPAIGN}.0.json").read_text())
        assert consumed["path"] == str((storage / CAMPAIGN / "round-0000" / "global").resolve())
        assert consumed["sha256"] == hash_tree(storage / CAMPAIGN / "round-0000" / "global")

        # a forged event: the genuine campaign and round, a forged folder and its own hashes
        forged_extra = {**extra, "path": str(forged),
                        "sha256": {f"global/{k}": v for k, v in hash_tree(forged).items()}}  # fmt: skip
        (out / f"{CAMPAIGN}.0.json").unlink()
        run, state = run_for_event(airflow, asset_id, forged_extra, known)
        log = airflow.task_log(CONSUMER, run, "consume")
        assert state == "failed", log
        assert (
            "global-model event refused: campaign verifytest round 0: the event's sha256 is not the manifest's outputs"
            in log
        )
        assert not (out / f"{CAMPAIGN}.0.json").exists()  # nothing acted on the forged folder
    finally:
        airflow.remove_dag_file(dag_file, CONSUMER)
