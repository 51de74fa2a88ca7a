"""A lora-stacked round at a facility, on the tiny model: ``--stacked-update DIR --merged-base
DIR [--base-hashes FILE] --peft lora`` merges the round's update into the base (bit for bit the
aggregation's canonical base), then trains a fresh adapter on it; a diverged base is refused
with exit status 2, naming the tensor, before any training.

Starts: the training task once as a subprocess (one process, to its end); the refusals run in
this process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.adapter import LoraSettings, initial_adapter, read_adapter_config
from xffl_tasks.aggregate import aggregate
from xffl_tasks.train.__main__ import main as train_main
from xffl_tasks.train.config import HYPERPARAMETERS, ConfigError, build_config
from xffl_tasks.train.stacked_base import plan_stacked_base

REPO = Path(__file__).resolve().parents[3]
FAST = ["--seq-len", "64", "--batch-size", "8", "--learning-rate", "0.01", "--threads", "1"]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def round1(tiny, tmp_path_factory):
    """Round 0's aggregation of two facilities (r = 4, alpha 8; r = 8, alpha 8) on the tiny
    model: its output folder (stacked_update/, base/, base_hashes.json)."""
    tmp = tmp_path_factory.mktemp("stacked-round")
    clients = []
    for seed, (name, r) in enumerate((("it", 4), ("cz", 8))):
        folder = initial_adapter(tiny / "model", tmp / name, LoraSettings(r=r, alpha=8.0), seed=seed)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(100 + seed)
        tensors = {
            k: (torch.randn(v.shape, generator=generator) / 20 if ".lora_B." in k else v)
            for k, v in tensors.items()
        }  # as if trained: B moved from zero
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "metrics.json").write_text(json.dumps({"num_samples": 10 * (seed + 1)}))
        clients.append(folder)
    aggregate(tiny / "model", clients, tmp / "global", strategy="lora-stacked")
    return tmp / "global"


def config(tiny: Path, tmp: Path, **fields):
    return build_config({"model": str(tiny / "model"), "data": str(tiny / "data" / "italian"),
                         "out": str(tmp / "out"), **fields})  # fmt: skip


def test_the_round_paths_are_not_hyperparameters():
    for name in ("stacked_update", "merged_base", "base_hashes", "adapter"):
        assert name not in HYPERPARAMETERS


def test_the_flags_are_checked_before_anything_runs(tiny, round1, tmp_path):
    update = str(round1 / "stacked_update")
    assert plan_stacked_base(config(tiny, tmp_path)) is None
    cases = [
        ({"stacked_update": update}, "give both"),
        ({"merged_base": str(tmp_path / "m")}, "give both"),
        ({"stacked_update": update, "merged_base": str(tmp_path / "m")}, "give --peft lora"),
        ({"stacked_update": update, "merged_base": str(tmp_path / "m"), "peft": "lora",
          "adapter": str(tmp_path)}, "not --adapter"),  # fmt: skip
        ({"stacked_update": update, "merged_base": str(tmp_path / "out" / "m"), "peft": "lora"},
         "apart from --out"),  # fmt: skip
        ({"stacked_update": str(tmp_path), "merged_base": str(tmp_path / "m"), "peft": "lora"},
         "apart from --stacked-update"),  # fmt: skip
        ({"stacked_update": str(tiny), "merged_base": str(tmp_path / "m"), "peft": "lora"},
         "stacked_update.json"),  # fmt: skip
        ({"base_hashes": str(tmp_path / "none.json")}, "--base-hashes: .*cannot read"),
    ]
    for fields, problem in cases:
        with pytest.raises(ConfigError, match=problem):
            plan_stacked_base(config(tiny, tmp_path, **fields))
    plan = plan_stacked_base(config(tiny, tmp_path, stacked_update=update, merged_base=str(tmp_path / "m"),
                                    peft="lora", base_hashes=str(round1 / "base_hashes.json")))  # fmt: skip
    assert plan.base == tmp_path / "m" and plan.description.result.files == plan.expected.files


def test_a_round_merges_the_update_then_trains_a_fresh_adapter_on_it(tiny, round1, tmp_path):
    merged, out = tmp_path / "merged", tmp_path / "out"
    argv = [sys.executable, "-m", "xffl_tasks.train", "--model", str(tiny / "model"),
            "--data", str(tiny / "data" / "italian"), "--out", str(out), *FAST, "--max-steps", "2",
            "--stacked-update", str(round1 / "stacked_update"), "--merged-base", str(merged),
            "--base-hashes", str(round1 / "base_hashes.json"),
            "--peft", "lora", "--lora-r", "2", "--lora-alpha", "4"]  # fmt: skip
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digests(merged) == digests(round1 / "base")  # the canonical base, bit for bit
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == str(merged)
    assert metrics["base_sha256"] == json.loads((round1 / "base_hashes.json").read_text())["files"]
    assert read_adapter_config(out) == LoraSettings(r=2, alpha=4.0)


def test_a_diverged_base_is_refused_with_exit_status_2(tiny, round1, tmp_path, capsys):
    base = Path(shutil.copytree(tiny / "model", tmp_path / "base"))
    shard = next(base.glob("*.safetensors"))
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0x01  # the last tensor of the file
    shard.write_bytes(bytes(blob))
    argv = ["--model", str(base), "--data", str(tiny / "data" / "italian"), "--out", str(tmp_path / "out"),
            *FAST, "--max-steps", "1", "--peft", "lora", "--stacked-update", str(round1 / "stacked_update"),
            "--merged-base", str(tmp_path / "merged")]  # fmt: skip
    assert train_main(argv) == 2
    error = capsys.readouterr().err
    assert "refusing to train on this base" in error and "is not the base the update applies to: tensor '" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
    # without an update, --base-hashes checks --model itself
    argv = ["--model", str(base), "--data", str(tiny / "data" / "italian"), "--out", str(tmp_path / "out"),
            *FAST, "--max-steps", "1", "--peft", "lora",
            "--base-hashes", str(round1 / "base_hashes.json")]  # fmt: skip
    assert train_main(argv) == 2
    assert "refusing to train on this base" in capsys.readouterr().err
