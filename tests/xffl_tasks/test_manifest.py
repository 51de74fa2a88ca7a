"""The manifest chain and `python -m xffl_tasks.verify`."""

from __future__ import annotations

import json
import subprocess
import sys

from xffl_tasks.manifest import hash_tree, sha256_file, verify_campaign, write_manifest


def make_campaign(root, rounds=3):
    campaign = root / "demo"
    previous = None
    for number in range(rounds):
        folder = campaign / f"round-{number:04d}"
        (folder / "global").mkdir(parents=True)
        (folder / "global" / "model.safetensors").write_bytes(bytes([number]) * 100)
        outputs = {f"global/{k}": v for k, v in hash_tree(folder / "global").items()}
        previous = write_manifest(folder, {"campaign": "demo", "round": number, "outputs": outputs}, previous)
    return campaign


def verify_cli(campaign):
    return subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(campaign)], capture_output=True, text=True)


def test_an_intact_chain_verifies(tmp_path):
    campaign = make_campaign(tmp_path)
    assert verify_campaign(campaign) == []
    second = json.loads((campaign / "round-0001" / "manifest.json").read_text())
    assert second["previous_manifest_sha256"] == sha256_file(campaign / "round-0000" / "manifest.json")
    result = verify_cli(campaign)
    assert result.returncode == 0 and "3 round(s)" in result.stdout


def test_one_changed_byte_in_an_older_manifest_breaks_the_chain(tmp_path):
    campaign = make_campaign(tmp_path)
    path = campaign / "round-0000" / "manifest.json"
    data = bytearray(path.read_bytes())
    data[data.index(b'"demo"') + 1] ^= 0x01  # "demo" -> "eemo"
    path.write_bytes(bytes(data))
    problems = verify_campaign(campaign)
    assert len(problems) == 1 and "round-0001/manifest.json" in problems[0] and "was changed" in problems[0]
    result = verify_cli(campaign)
    assert result.returncode == 1 and "FAIL round-0001" in result.stderr


def test_changed_output_and_missing_round_are_reported(tmp_path):
    campaign = make_campaign(tmp_path)
    (campaign / "round-0002" / "global" / "model.safetensors").write_bytes(b"x")
    (campaign / "round-0001" / "manifest.json").unlink()
    problems = verify_campaign(campaign)
    assert any("round-0001: no manifest.json" in p for p in problems)
    assert any("round-0002: output global/model.safetensors does not match" in p for p in problems)
    assert verify_campaign(campaign, check_files=False) == ["round-0001: no manifest.json"]


def test_not_a_campaign(tmp_path):
    assert verify_campaign(tmp_path / "nothing") == [f"{tmp_path / 'nothing'}: no such campaign folder"]


def test_the_chain_crosses_into_the_campaign_a_warm_start_came_from(tmp_path):
    source = make_campaign(tmp_path / "a", rounds=2)
    linked = source / "round-0001" / "manifest.json"
    folder = tmp_path / "b" / "round-0000"
    folder.mkdir(parents=True)
    record = {"campaign": "b", "round": 0, "warm_start": {
        "campaign": "demo", "round": 1, "manifest": str(linked), "manifest_sha256": sha256_file(linked)}}  # fmt: skip
    write_manifest(folder, record, linked)
    campaign = tmp_path / "b"
    assert verify_campaign(campaign) == []
    from xffl_tasks.manifest import warm_start_lineage

    assert warm_start_lineage(campaign) == [("demo", 1)]
    result = verify_cli(campaign)
    assert result.returncode == 0 and "warm-started from demo round 1" in result.stdout
    # a byte changed in the source's older round breaks the check of the warm-started campaign
    older = source / "round-0000" / "manifest.json"
    data = bytearray(older.read_bytes())
    data[10] ^= 0x20
    older.write_bytes(bytes(data))
    problems = verify_campaign(campaign)
    assert len(problems) == 1 and problems[0].startswith("warm-start source demo: round-0001/manifest.json")
    # and a changed source manifest is caught at the link itself
    linked.write_text(linked.read_text() + " ")
    assert any("warm-start manifest" in p and "was changed" in p for p in verify_campaign(campaign))
