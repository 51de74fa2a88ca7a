"""A global-model asset event is a claim; ``verify_global_model_event`` checks it against the
campaign's own records (owner, manifest, chain, files on disk) and refuses, naming what failed.

Unit level: campaigns made in ``tmp_path`` with ``xffl_tasks.manifest.write_manifest``; nothing
is started.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from xffl_airflow.federation.assets import (
    GlobalModelEventRefused,
    VerifiedGlobalModel,
    verify_global_model_event,
)

from xffl_tasks.manifest import hash_tree, write_manifest

DAG_ID = "xffl_demo"


def make_campaign(
    storage: Path, campaign: str = "demo", rounds: int = 2, dag_id: str = DAG_ID
) -> list[dict]:
    """A campaign of ``rounds`` finished rounds (tiny files for the global model); returns each
    round's event extra as ``finalize`` emits it."""
    folder = storage / campaign
    folder.mkdir(parents=True)
    (folder / "campaign.json").write_text(json.dumps({"dag_id": dag_id, "campaign": campaign}))
    events, previous = [], None
    for number in range(rounds):
        round_dir = folder / f"round-{number:04d}"
        (round_dir / "global").mkdir(parents=True)
        (round_dir / "global" / "model.safetensors").write_bytes(bytes([number]) * 1000)
        (round_dir / "global" / "config.json").write_text('{"model_type": "gpt2"}\n')
        outputs = {f"global/{k}": v for k, v in hash_tree(round_dir / "global").items()}
        run_id = f"xffl__{campaign}__round-{number:04d}"
        decision = {
            "stop": number == rounds - 1,
            "reason": "max_rounds" if number == rounds - 1 else "continue",
        }
        previous = write_manifest(round_dir, {"campaign": campaign, "round": number, "dag_id": dag_id,
                                              "run_id": run_id, "outputs": outputs,
                                              "weighted_val_loss": 2.0 - number / 10, "decision": decision},
                                  previous)  # fmt: skip
        events.append({"campaign": campaign, "round": number, "run_id": run_id,
                       "path": str(round_dir / "global"), "manifest": str(previous), "sha256": outputs,
                       "weighted_val_loss": 2.0 - number / 10, "decision": decision})  # fmt: skip
    return events


@pytest.fixture
def storage(tmp_path) -> Path:
    return tmp_path / "storage"


def refused(extra, storage, dag_id=DAG_ID, **kwargs) -> str:
    with pytest.raises(GlobalModelEventRefused) as caught:
        verify_global_model_event(extra, storage=storage, dag_id=dag_id, **kwargs)
    assert str(caught.value).startswith("global-model event refused: ")
    return str(caught.value)


def test_a_genuine_event_verifies_and_carries_the_campaign_s_own_record(storage):
    events = make_campaign(storage)
    model = verify_global_model_event(
        events[1], storage=storage, dag_id=DAG_ID, check_all_files=True
    )
    assert isinstance(model, VerifiedGlobalModel)
    assert (model.campaign, model.round, model.run_id) == ("demo", 1, "xffl__demo__round-0001")
    assert model.path == (storage / "demo" / "round-0001" / "global").resolve()
    assert model.manifest == model.path.parent / "manifest.json"
    assert model.sha256 == hash_tree(model.path) and set(model.sha256) == {
        "config.json",
        "model.safetensors",
    }
    assert (
        model.decision == {"stop": True, "reason": "max_rounds"} and model.weighted_val_loss == 1.9
    )
    # the event's own values are not taken: a forged decision changes nothing returned
    forged = {**events[1], "decision": {"stop": False}, "weighted_val_loss": -1}
    assert (
        verify_global_model_event(forged, storage=storage, dag_id=DAG_ID).decision["stop"] is True
    )
    # path, manifest and run_id are optional in the event; sha256 is not
    minimal = {k: events[0][k] for k in ("campaign", "round", "sha256")}
    assert verify_global_model_event(minimal, storage=storage, dag_id=DAG_ID).round == 0


def test_an_event_pointing_at_a_forged_folder_is_refused(storage, tmp_path):
    events = make_campaign(storage)
    forged = tmp_path / "forged" / "global"
    forged.mkdir(parents=True)
    (forged / "model.safetensors").write_bytes(b"evil" * 250)
    forged_hashes = {f"global/{k}": v for k, v in hash_tree(forged).items()}
    # the forged folder with its own hashes: not what the campaign's manifest records
    message = refused({**events[0], "path": str(forged), "sha256": forged_hashes}, storage)
    assert message.endswith(
        "campaign demo round 0: the event's sha256 is not the manifest's outputs"
    )
    # the genuine hashes, but the forged folder as path
    message = refused({**events[0], "path": str(forged)}, storage)
    assert (
        f"the event's path '{forged}' is not {(storage / 'demo/round-0000/global').resolve()}"
        in message
    )
    message = refused(
        {**events[0], "manifest": str(tmp_path / "forged" / "manifest.json")}, storage
    )
    assert "the event's manifest" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"campaign": "../etc"}, "campaign '../etc' is not a campaign name"),
        ({"campaign": "Demo"}, "campaign 'Demo' is not a campaign name"),
        ({"campaign": None}, "campaign None is not a campaign name"),
        ({"round": True}, "round True is not a round number"),
        ({"round": "0"}, "round '0' is not a round number"),
        ({"round": 7}, "campaign demo round 7: folder"),
        ({"campaign": "other"}, "campaign other: folder"),
        (
            {"run_id": "xffl__demo__round-0009"},
            "run_id 'xffl__demo__round-0009' is not the manifest's",
        ),
        ({"sha256": {}}, "the event's sha256 is not the manifest's outputs"),
    ],
)
def test_an_event_whose_claims_do_not_match_is_refused_naming_what(storage, change, expected):
    events = make_campaign(storage)
    assert expected in refused({**events[0], **change}, storage)


def test_an_event_that_is_not_a_mapping_is_refused(storage):
    assert "is not a mapping but list" in refused(["demo"], storage)


def test_another_dag_s_campaign_is_refused(storage):
    events = make_campaign(storage)
    assert "campaign demo belongs to DAG 'xffl_demo', not xffl_other" in refused(
        events[0], storage, "xffl_other"
    )
    (storage / "demo" / "campaign.json").unlink()  # without an owner record, the manifest decides
    assert "records dag_id 'xffl_demo', not 'xffl_other'" in refused(
        events[0], storage, "xffl_other"
    )


def test_symlinked_campaign_and_round_folders_are_refused(storage, tmp_path):
    outside = tmp_path / "outside"
    events = make_campaign(outside, campaign="evil")
    storage.mkdir()
    (storage / "evil").symlink_to(outside / "evil")
    assert "campaign evil: folder" in refused(events[0], storage) and "leads to" in refused(
        events[0], storage
    )
    events = make_campaign(storage)
    shutil.move(storage / "demo" / "round-0001", tmp_path / "moved-round")
    (storage / "demo" / "round-0001").symlink_to(tmp_path / "moved-round")
    assert "campaign demo round 1: folder" in refused(events[1], storage)


def test_a_changed_file_or_manifest_is_refused(storage):
    events = make_campaign(storage)
    model = storage / "demo" / "round-0001" / "global" / "model.safetensors"
    model.write_bytes(b"\x00" * 1000)
    assert "output global/model.safetensors does not hash to its recorded sha256" in refused(
        events[1], storage
    )
    model.unlink()
    assert "output global/model.safetensors is missing" in refused(events[1], storage)
    model.symlink_to(storage / "demo" / "round-0000" / "global" / "model.safetensors")
    assert "is not a regular file inside" in refused(events[1], storage)


def test_a_broken_chain_is_refused_but_a_round_under_way_is_not(storage):
    events = make_campaign(storage, rounds=3)
    (storage / "demo" / "round-0003" / "global").mkdir(parents=True)  # the next round, running
    assert verify_global_model_event(events[2], storage=storage, dag_id=DAG_ID).round == 2
    first = storage / "demo" / "round-0000" / "manifest.json"
    first.write_text(
        first.read_text().replace('"weighted_val_loss": 2.0', '"weighted_val_loss": 0.1')
    )
    message = refused(events[2], storage)
    assert (
        "campaign demo: its manifest chain does not verify: round-0001/manifest.json: previous_manifest_sha256"
        in message
    )


def test_a_manifest_that_records_another_round_or_lists_outside_files_is_refused(storage):
    events = make_campaign(storage, rounds=1)
    path = storage / "demo" / "round-0000" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "round": 1}))
    assert "records round 1, not 0" in refused(events[0], storage)
    outside = {"../campaign.json": "0" * 64}
    path.write_text(json.dumps({**manifest, "outputs": outside}))
    assert "output '../campaign.json' is not a file of global/" in refused(
        {**events[0], "sha256": outside}, storage
    )
    path.write_text("not json")
    assert "manifest" in refused(events[0], storage) and "is unreadable: not JSON" in refused(
        events[0], storage
    )
    path.unlink()
    assert "campaign demo round 0: no manifest at" in refused(events[0], storage)
