"""Training is repeatable: the same configuration and seed on the tiny model write
byte-identical weights in two separate processes, for the whole model and for a new LoRA
adapter (whose initial A is drawn at random); another seed writes other weights.

Starts: ``python -m xffl_tasks.train`` as subprocesses (five short runs, one at a time, each
run to its end).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xffl_tasks.train.determinism import repeatable, seed_everything

from .test_train import FAST, run_cli, train_command

#: Everything in an output folder but metrics.json, which holds times.
TIMED = {"metrics.json"}


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), torch.rand(1).item()


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert all(a != b for a, b in zip(draws(), first))


def test_repeatable_turns_deterministic_kernels_on_for_cpus_and_restores_the_setting():
    assert not torch.are_deterministic_algorithms_enabled()
    with repeatable(3, torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        inside = torch.rand(2).tolist()
    assert not torch.are_deterministic_algorithms_enabled()
    with repeatable(3, torch.device("meta")):  # not a CPU: the kernels are left as they were
        assert not torch.are_deterministic_algorithms_enabled()
    seed_everything(3)
    assert torch.rand(2).tolist() == inside


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in TIMED
    }


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """Full model twice (seed 0); a new LoRA adapter twice with seed 0 and once with seed 1."""
    root = tmp_path_factory.mktemp("repeat")
    settings = {
        "full-a": ["--max-steps", "4"],
        "full-b": ["--max-steps", "4"],
        "lora-a": ["--max-steps", "2", "--peft", "lora"],
        "lora-b": ["--max-steps", "2", "--peft", "lora"],
        "lora-seed1": ["--max-steps", "2", "--peft", "lora", "--seed", "1"],
    }
    outputs = {}
    for name, extra in settings.items():
        out = root / name
        command = [sys.executable, "-m", "xffl_tasks.train"]
        result = run_cli([*command, *train_command(tiny, out, *FAST, "--threads", "1", *extra)])
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = out
    return outputs


def test_two_runs_of_the_whole_model_write_identical_files(runs):
    first, second = file_digests(runs["full-a"]), file_digests(runs["full-b"])
    assert "model.safetensors" in first and "tokenizer.json" in first
    assert first == second
    metrics = [json.loads((runs[n] / "metrics.json").read_text()) for n in ("full-a", "full-b")]
    for key in ("train_loss", "val_loss_before", "val_loss_after", "num_samples", "threads"):
        assert metrics[0][key] == metrics[1][key], key


def test_two_runs_of_a_new_adapter_write_identical_files_and_another_seed_does_not(runs):
    first, second = file_digests(runs["lora-a"]), file_digests(runs["lora-b"])
    assert first["adapter_model.safetensors"] == second["adapter_model.safetensors"]
    assert first == second
    other = file_digests(runs["lora-seed1"])
    assert other["adapter_model.safetensors"] != first["adapter_model.safetensors"]
