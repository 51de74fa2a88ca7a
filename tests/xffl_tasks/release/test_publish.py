"""Publishing releases and verifying them: the folder, its read-only files, release.json's
links (campaign chain, previous release), concurrent publishers, LoRA, and what tampering
``python -m xffl_tasks.verify`` catches.

Starts: ``python -m xffl_tasks.verify`` once as a subprocess; the concurrent publishers are
threads of this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from xffl_tasks.manifest import sha256_file
from xffl_tasks.release import (
    FinalEvaluation,
    ReleaseError,
    choose_best_round,
    publish_release,
    read_campaign,
    release_numbers,
    render_card,
    verify_release,
    verify_releases,
)
from xffl_tasks.verify import main as verify_main

from .conftest import make_campaign, write_base

REPO = Path(__file__).resolve().parents[3]
RECORD = {
    "comparison": {"passes": True},
    "approval": {"by": "lead", "at": "2026-01-05T09:00:00+00:00"},
}


def selection_of(campaign, final=2.2):
    return choose_best_round(read_campaign(campaign).manifests, FinalEvaluation(final))


def publish(root, campaign, *, final=2.2, record=RECORD, **extra):
    selection = selection_of(campaign, final)
    chain = read_campaign(campaign)
    card = render_card(federation="demo", manifests=chain.manifests, final_manifest_sha256=chain.final_sha256,
                       selection=selection, base_model="/models/start", facilities={})  # fmt: skip
    source = campaign / f"round-{selection.round:04d}" / "global"
    return publish_release(root, "demo", source, campaign_dir=campaign, selection=selection,
                           card_text=card, record=record, **extra)  # fmt: skip


def test_a_release_is_a_read_only_numbered_folder_that_verifies(tmp_path, campaign):
    release = publish(tmp_path / "releases", campaign)
    assert release == tmp_path / "releases" / "demo" / "1"
    assert sorted(p.relative_to(release).as_posix() for p in release.rglob("*")) == [
        "README.md", "model", "model/aggregation.json", "model/config.json", "model/model.safetensors",
        "release.json",
    ]  # fmt: skip
    assert (release / "model" / "model.safetensors").read_bytes() == bytes([1]) * 64  # round 1's
    for path in [release, *release.rglob("*")]:
        assert path.stat().st_mode & 0o222 == 0, path
    data = json.loads((release / "release.json").read_text())
    assert (data["format"], data["number"], data["federation"], data["kind"]) == (
        "xffl-release",
        1,
        "demo",
        "model",
    )
    assert data["previous_release"] is None and data["record"] == RECORD
    assert data["source"]["round"] == 1 and data["source"]["campaign"] == "c1"
    assert data["campaign"]["final_round"] == 3
    assert data["campaign"]["final_manifest_sha256"] == sha256_file(
        campaign / "round-0003" / "manifest.json"
    )
    assert data["selection"]["round"] == 1 and data["selection"]["loss"] == 2.0
    assert data["files"]["README.md"] == sha256_file(release / "README.md")
    assert verify_release(release) == []
    result = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(release)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "release 1 of demo" in result.stdout, result.stderr
    assert [p.name for p in release.parent.iterdir()] == ["1"]  # no staging left


def test_releases_chain_and_concurrent_publishers_get_distinct_numbers(tmp_path, campaign):
    first = publish(tmp_path / "releases", campaign)
    results, errors = [], []

    def run():
        try:
            results.append(publish(tmp_path / "releases", campaign))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in results) == ["2", "3", "4", "5"]
    for number in range(2, 6):
        data = json.loads((first.parent / str(number) / "release.json").read_text())
        link = data["previous_release"]
        assert link["number"] == number - 1
        assert link["release_json_sha256"] == sha256_file(
            first.parent / str(number - 1) / "release.json"
        )
    assert verify_releases(first.parent) == []
    assert verify_main([str(first.parent)]) == 0
    assert sorted(os.listdir(first.parent)) == ["1", "2", "3", "4", "5"]


def writable(path: Path) -> None:
    path.parent.chmod(0o755)
    path.chmod(0o644)


def test_verify_catches_tampering(tmp_path, campaign, capsys):
    root = tmp_path / "releases"
    first, second = publish(root, campaign), publish(root, campaign)
    weights = second / "model" / "model.safetensors"
    writable(weights)
    weights.write_bytes(b"x" * 64)
    assert verify_release(second) == ["model/model.safetensors: does not match its recorded sha256"]
    assert verify_main([str(second)]) == 1
    assert "FAIL model/model.safetensors" in capsys.readouterr().err
    extra = first / "model" / "extra.bin"
    (first / "model").chmod(0o755)
    extra.write_bytes(b"")
    assert "model/extra.bin: not listed in release.json" in verify_release(first)
    extra.unlink()
    writable(first / "release.json")
    (first / "release.json").write_text(
        (first / "release.json").read_text().replace("lead", "someone")
    )
    assert any("previous release 1" in p and "was changed" in p for p in verify_release(second))
    manifest = campaign / "round-0002" / "manifest.json"  # the loss of round 1's global model
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "weighted_val_loss": 2.4}))
    problems = verify_release(first)
    assert any("final manifest" in p or "previous_manifest_sha256" in p for p in problems)
    assert any(p.startswith("selection: ") and "the chain gives round 2" in p for p in problems)


def test_publishing_refuses_a_model_the_manifest_does_not_record(tmp_path, campaign):
    selection = selection_of(campaign)
    wrong = campaign / "round-0002" / "global"  # not the chosen round's model
    with pytest.raises(ReleaseError, match="is not the .* round 1's manifest"):
        publish_release(
            tmp_path / "r", "demo", wrong, campaign_dir=campaign, selection=selection, card_text=""
        )
    forged = replace(selection, round=2, loss=2.1)  # not the chain's choice
    with pytest.raises(ReleaseError, match="selection: records round 2 .* the chain gives round 1"):
        publish_release(tmp_path / "r", "demo", wrong, campaign_dir=campaign, selection=forged,
                        card_text="", record={"x": 1})  # fmt: skip
    with pytest.raises(ReleaseError, match="record: not JSON-safe"):
        publish(tmp_path / "r", campaign, record={"x": float("nan")})
    with pytest.raises(ReleaseError, match="federation"):
        publish_release(
            tmp_path / "r", "../x", wrong, campaign_dir=campaign, selection=selection, card_text=""
        )
    assert list((tmp_path / "r" / "demo").iterdir()) == []  # nothing left behind


def test_a_lora_release_holds_the_merged_model_and_the_adapter(tmp_path):
    base = write_base(tmp_path / "base")
    campaign = make_campaign(tmp_path / "storage", [3.0, 2.5, 2.6], lora_base=base)
    release = publish(tmp_path / "releases", campaign, final=2.7, base_model_dir=base)
    names = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert names == ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "adapter/aggregation.json", "model/config.json", "model/model.safetensors",
                     "release.json"]  # fmt: skip
    data = json.loads((release / "release.json").read_text())
    assert data["kind"] == "lora" and data["source"]["round"] == 0
    assert data["source"]["base_model_files"] == {"config.json": sha256_file(base / "config.json"),
                                                  "model.safetensors": sha256_file(base / "model.safetensors")}  # fmt: skip
    assert verify_release(release) == []
    other = write_base(tmp_path / "other")
    (other / "config.json").write_text('{"model_type": "mistral"}\n')
    with pytest.raises(ReleaseError, match="config.json is not the base model file"):
        publish(tmp_path / "releases", campaign, final=2.7, base_model_dir=other)


def test_a_publisher_that_loses_the_race_takes_the_next_number(tmp_path, campaign, monkeypatch):
    from xffl_tasks.release import publish as module

    first = publish(tmp_path / "releases", campaign)
    calls = []

    def stale(folder):  # the first look misses release 1, as if it appeared just after
        calls.append(folder)
        numbers = release_numbers(folder)
        return numbers[:-1] if len(calls) == 1 else numbers

    monkeypatch.setattr(module, "release_numbers", stale)
    second = publish(tmp_path / "releases", campaign)
    assert second.name == "2" and len(calls) == 2
    assert json.loads((second / "release.json").read_text())["previous_release"]["number"] == 1
    assert verify_release(second) == [] and verify_release(first) == []
