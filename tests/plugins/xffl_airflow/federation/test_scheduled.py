"""Scheduled and warm-started campaigns, unit level: which campaign a warm start comes from,
when another campaign of the config is in flight (round 0 of a new one is then skipped), what
round 0's manifest records, the run note and the global-model asset. Nothing is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from xffl_airflow.federation.assets import global_model_asset
from xffl_airflow.federation.config import load_config
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.rounds.campaigns import campaign_in_flight, warm_start_source
from xffl_airflow.federation.rounds.finalize import round_note
from xffl_airflow.federation.rounds.prepare import prepare_round

from xffl_tasks.manifest import sha256_file, write_manifest

CONNECTION = json.dumps({"conn_type": "ssh", "host": "login.example.org", "login": "xffl"})


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_ITALY", CONNECTION)
    monkeypatch.setattr("xffl_airflow.federation.rounds.prepare.check_connections", lambda config: None)
    storage, model = tmp_path / "campaigns", tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def config(**extra):
        data = {"campaign": "sched", "storage": str(storage), "base_model": str(model), "warm_start": True,
                "facilities": [{"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data"}], **extra}  # fmt: skip
        path = tmp_path / "sched.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return storage, config


def dag_of(path) -> FederationDag:
    return FederationDag.of(load_config(path), str(path))


def campaign(storage: Path, name: str, decisions: list[bool | None], finished_at: str = "2026-01-01T00:00:00",
             dag_id: str = "xffl_sched") -> Path:  # fmt: skip
    """Round folders with manifests; a None decision is a round that has no manifest (failed)."""
    previous = None
    for number, stop in enumerate(decisions):
        folder = storage / name / f"round-{number:04d}"
        (folder / "global").mkdir(parents=True)
        (folder / "global" / "config.json").write_text("{}")
        if stop is not None:
            record = {"campaign": name, "round": number, "dag_id": dag_id, "finished_at": finished_at, "decision": {"stop": stop},
                      "next_run_id": None if stop else f"xffl__{name}__round-{number + 1:04d}"}  # fmt: skip
            previous = write_manifest(folder, record, previous)
    return storage / name


def test_the_newest_finished_campaign_is_the_source_and_unfinished_ones_only_when_allowed(setup):
    storage, config = setup
    campaign(storage, "sched-20260101t0000", [False, True], "2026-01-01T01:00:00")
    campaign(storage, "sched-20260102t0000", [False, None], "2026-01-02T01:00:00")  # failed in round 1
    campaign(storage, "sched-20260103t0000", [False], "2026-01-03T01:00:00")  # stopped going on
    campaign(storage, "other-20260104t0000", [True], "2026-01-04T01:00:00", "xffl_other")  # another config's
    # in this DAG's namespace, newer, finished, but another DAG's campaign: never a source
    campaign(storage, "sched-20260105t0000", [True], "2026-01-05T01:00:00", "xffl_sched_lora")
    source = warm_start_source(dag_of(config()), exclude="sched-new", unfinished=False, marker="config.json")
    manifest = storage / "sched-20260101t0000" / "round-0001" / "manifest.json"
    assert source == {
        "campaign": "sched-20260101t0000", "round": 1, "finished": True,
        "model": str(manifest.parent / "global"), "manifest": str(manifest), "manifest_sha256": sha256_file(manifest),
    }  # fmt: skip
    allowed = warm_start_source(dag_of(config()), exclude="sched-new", unfinished=True, marker="config.json")
    assert (allowed["campaign"], allowed["round"], allowed["finished"]) == ("sched-20260103t0000", 0, False)
    assert warm_start_source(dag_of(config()), exclude="sched-20260101t0000", unfinished=False, marker="config.json") is None


def test_a_campaign_is_in_flight_while_its_next_round_is_queued_or_running(setup):
    storage, config = setup
    campaign(storage, "sched-a", [False])  # round 1 triggered
    campaign(storage, "sched-b", [True])  # finished
    campaign(storage, "sched-c", [False, None])  # round 1 has no manifest yet
    campaign(storage, "sched-d", [False], dag_id="xffl_sched_lora")  # another DAG's, in the namespace
    asked = []

    def active(names):
        def count(run_ids):
            asked.append(run_ids)
            return sum(r in names for r in run_ids)

        return count

    cfg = dag_of(config())
    assert campaign_in_flight(cfg, exclude="sched-new", active=active(set())) is None
    assert asked[0] == ["xffl__sched-a__round-0001", "xffl__sched-c__round-0001"]
    assert campaign_in_flight(cfg, exclude="sched-new", active=active({"xffl__sched-c__round-0001"})) == (
        "sched-c", "xffl__sched-c__round-0001",
    )  # fmt: skip
    assert campaign_in_flight(cfg, exclude="sched-c", active=active({"xffl__sched-c__round-0001"})) is None


def test_round_0_of_a_new_campaign_is_skipped_while_another_is_in_flight(setup, caplog):
    storage, config = setup
    path = config()
    campaign(storage, "sched-a", [False])

    def prepare(active, conf=None):
        return prepare_round(dag=dag_of(path), dag_facilities=["italy"], run="scheduled__1",
                             run_conf=conf or {"round": 0}, run_type="scheduled",
                             logical_date=__import__("datetime").datetime(2026, 1, 5, 12, 0), active_runs=active)  # fmt: skip

    caplog.set_level("WARNING")
    assert prepare(lambda ids: len(ids)) is None
    assert "campaign sched-a of this DAG is still running" in caplog.text
    assert not (storage / "sched-20260105t1200").exists()
    # the in-flight campaign's own next round is never held back
    assert prepare(lambda ids: len(ids), {"round": 1, "campaign": "sched-a"}).plan.campaign == "sched-a"
    # once it is no longer active, the scheduled campaign starts, warm from nothing finished yet
    sealed = prepare(lambda ids: 0)
    assert sealed.plan.campaign == "sched-20260105t1200" and sealed.plan.warm_start is None


def test_round_0_plan_records_the_warm_start_source(setup):
    storage, config = setup
    source = campaign(storage, "sched-a", [False, True])
    plan = prepare_round(dag=dag_of(config()), dag_facilities=["italy"], run="manual__1",
                         run_conf={"round": 0, "campaign": "sched-b"}, run_type="manual", active_runs=lambda ids: 0).plan  # fmt: skip
    linked = source / "round-0001" / "manifest.json"
    assert plan.input_model == str(source / "round-0001" / "global")
    assert plan.warm_start.manifest == str(linked)
    assert plan.warm_start.manifest_sha256 == sha256_file(linked)


def test_the_run_note_names_campaign_and_round_and_links_the_previous_run():
    note = round_note("e2e", 2, 3, previous_run="xffl__e2e__round-0001", previous_url="http://x/dags/d/runs/r", loss=4.5)
    assert note == ("Campaign **e2e**, round 2 (at most 3); continues "
                    "[xffl__e2e__round-0001](http://x/dags/d/runs/r) (weighted validation loss 4.5000)")  # fmt: skip
    assert round_note("e2e", 0, 3) == "Campaign **e2e**, round 0 (at most 3)"


def test_one_global_model_asset_per_config(setup):
    _, config = setup
    asset = global_model_asset(load_config(config()))
    storage = str(load_config(config()).storage)
    assert asset.uri == f"xffl://sched{storage}/global-model" and asset.name == "xffl_sched_global_model"
    assert asset.group == "xffl"
