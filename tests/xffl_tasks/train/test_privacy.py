"""DP-SGD training (``--dp-mode dp-sgd``) on the tiny model, end to end: the privacy map in
metrics.json and what else leaves the facility (no training loss, the expected sample count,
the validation losses only unless withheld), per-sample clipping at work, LoRA with a target
epsilon, Poisson batches that leave a process empty-handed, bit-reproducibility under one
secret seed, and two DDP processes under ``torchrun`` that train exactly as one process does.

Starts: ``torchrun`` with two workers (one DP run) as a subprocess, to its end; the
single-process runs call the recipe's ``run`` in this process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.xffl_tasks.train.equivalence import (
    LOSS_ATOL,
    TENSOR_ATOL,
    TENSOR_RTOL,
    TWO_PROCESS_FLAGS,
    tensor_differences,
)
from xffl_tasks.aggregate.metrics import parse_metrics, read_metrics
from xffl_tasks.aggregate.weights import ClientWeight, weight_from_metrics
from xffl_tasks.privacy import DpRound, epsilon, noise_for_epsilon, params_from_metrics
from xffl_tasks.train.config import TrainingConfig
from xffl_tasks.train.loop import TrainingResult
from xffl_tasks.train.privacy import PrivateRun
from xffl_tasks.train.recipe import run

REPO = Path(__file__).resolve().parents[3]
SECRET = {"XFFL_DP_SEED": "20261206"}
CZECH_SEQUENCES = 1476  # the tiny Czech corpus's training sequences of 64 tokens
ADAM_EPS = 1e-8  # torch's AdamW default, which the training keeps
TRAINING_LOSSES = ("train_loss", "train_loss_last", "train_loss_curve", "train_loss_curve_every")
#: out -> the run's TrainingResult: what the loop saw (the sequences drawn, every step's loss),
#: which stays in the process; metrics.json has none of it.
SEEN: dict[Path, TrainingResult] = {}


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def private_run(tiny: Path, out: Path, environ: dict | None = None, **fields) -> Path:
    config = TrainingConfig(**{
        "model": str(tiny / "model"), "data": str(tiny / "data" / "czech"), "out": str(out),
        "seq_len": 64, "learning_rate": 0.003, "precision": "fp32", "val_max_sequences": 8,
        "log_every": 100, "dp_mode": "dp-sgd", **fields,
    })  # fmt: skip
    train = PrivateRun.train

    def seen(self, *args, **kwargs) -> TrainingResult:
        SEEN[out] = train(self, *args, **kwargs)
        return SEEN[out]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PrivateRun, "train", seen)
        run(config, environ=SECRET if environ is None else environ)
    return out


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory):
    """8 steps, logical batches of 8 expected, cut into micro-batches of 4, noise 1."""
    out = tmp_path_factory.mktemp("dp-full") / "out"
    return private_run(
        tiny, out, batch_size=4, gradient_accumulation=2, max_steps=8, dp_noise_multiplier=1.0
    )


@pytest.fixture(scope="module")
def ddp(tiny, tmp_path_factory):
    """The same run as ``full`` by two DDP processes of 4 expected sequences each."""
    out = tmp_path_factory.mktemp("dp-ddp") / "out"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "xffl_tasks.train", "--model", str(tiny / "model"), "--data", str(tiny / "data" / "czech"),
        "--out", str(out), *TWO_PROCESS_FLAGS, "--val-max-sequences", "8",
        "--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1.0",
    ]  # fmt: skip
    result = subprocess.run(
        argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, **SECRET},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """A new LoRA adapter, noise set for epsilon 3 after 6 steps; 1 sequence expected a step,
    so some steps draw none."""
    runs = []
    for name in ("first", "again"):
        out = tmp_path_factory.mktemp(f"dp-lora-{name}") / "out"
        runs.append(
            private_run(tiny, out, peft="lora", batch_size=1, max_steps=6, dp_target_epsilon=3.0)
        )
    return runs


def test_the_privacy_map_of_a_full_fine_tuning_run(full):
    metrics = metrics_of(full)
    privacy = metrics["privacy"]
    assert {k: privacy[k] for k in ("mode", "steps", "noise_multiplier", "max_grad_norm", "accountant",
                                    "poisson", "num_train_sequences", "world_size", "secret_seed")} == {
        "mode": "dp-sgd", "steps": 8, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp",
        "poisson": True, "num_train_sequences": 1476, "world_size": 1, "secret_seed": "environment",
    }  # fmt: skip
    assert privacy["sample_rate"] == 8 / CZECH_SEQUENCES
    assert privacy["delta"] == 1 / (10 * CZECH_SEQUENCES)
    assert privacy["epsilon"] == pytest.approx(0.66794, abs=1e-5)
    assert privacy["epsilon"] == epsilon([DpRound(8 / 1476, 1.0, 8)], delta=1 / 14760)
    assert metrics["steps"] == 8 and metrics["train_sequences"] == CZECH_SEQUENCES
    assert math.isfinite(metrics["val_loss_after"])
    assert metrics["hyperparameters"]["dp_mode"] == "dp-sgd"
    # what the aggregation keeps of it, and what its accountant reads back
    kept = parse_metrics((full / "metrics.json").read_bytes(), "czech")
    assert kept["privacy"] == privacy
    assert params_from_metrics(kept["privacy"]) == (DpRound(8 / 1476, 1.0, 8), 1 / 14760)


def test_a_dp_run_releases_no_training_loss_and_the_expected_sample_count(full):
    """Nothing computed from the drawn batches without noise: no training loss; num_samples
    is round(q N) x steps = round(8/1476 x 1476) x 8 = 64 whatever was drawn, and the counts
    and rates derived from it follow it."""
    metrics = metrics_of(full)
    assert not set(TRAINING_LOSSES) & set(metrics)
    assert metrics["num_samples"] == 8 * 8
    assert metrics["num_tokens"] == 8 * 8 * 64
    assert metrics["epochs"] == 64 / 1476
    assert metrics["tokens_per_second"] == 64 * 64 / metrics["seconds"]
    privacy = metrics["privacy"]
    assert privacy["num_samples_rule"] == "expected"
    assert privacy["expected_batch_size"] * privacy["steps"] == metrics["num_samples"]
    assert privacy["validation_losses_reported"] is True
    assert privacy["withheld"] == list(TRAINING_LOSSES)
    assert math.isfinite(metrics["val_loss_before"]) and metrics["val_tokens"] == 8 * 63
    # the loop itself saw its draws and losses: they stayed in the process
    seen = SEEN[full]
    assert seen.steps == 8 and len(seen.step_losses) > 0
    # the aggregation reads it, and weighs the facility by the expected count
    kept = read_metrics(full, "czech")
    assert kept["num_samples"] == 64 and kept["num_tokens"] == 4096
    assert not set(TRAINING_LOSSES) & set(kept)
    assert weight_from_metrics(full, "czech") == ClientWeight(64.0, "num_samples", 64, 4096)


def test_the_validation_losses_can_be_withheld(tiny, tmp_path, monkeypatch, caplog):
    """--dp-withhold-validation: no validation pass at all (the held-out losses would be in
    the log, which leaves too), no val_loss_* in metrics.json, the split's size still there."""
    from xffl_tasks.train import loop

    def no_pass(*args, **kwargs):
        raise AssertionError("a validation pass ran")

    monkeypatch.setattr(loop, "evaluate", no_pass)
    caplog.set_level("INFO", logger="xffl_tasks")
    out = private_run(tiny, tmp_path / "out", batch_size=4, max_steps=2, log_every=1,
                      dp_noise_multiplier=1.0, dp_withhold_validation=True)  # fmt: skip
    metrics = metrics_of(out)
    gone = {*TRAINING_LOSSES, "val_loss_before", "val_loss_after"}
    assert not gone & set(metrics)
    assert (metrics["val_sequences"], metrics["val_tokens"]) == (8, 8 * 63)
    assert metrics["num_samples"] == 4 * 2 and metrics["hyperparameters"]["dp_withhold_validation"]
    privacy = metrics["privacy"]
    assert privacy["validation_losses_reported"] is False
    assert privacy["withheld"] == ["val_loss_before", "val_loss_after", *TRAINING_LOSSES]
    kept = read_metrics(out, "czech")
    assert not gone & set(kept) and kept["num_samples"] == 8
    assert params_from_metrics(kept["privacy"]) == (DpRound(4 / 1476, 1.0, 2), 1 / 14760)
    # nor does the job's log carry a loss or the sequences drawn
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("xffl_tasks")]
    assert any(m.startswith("step 2/2") for m in logged)
    assert not [m for m in logged if re.search(r"\b(loss|batch)\b", m)], logged
    assert any(m.endswith("2 steps, 8 samples, %.0f tokens/s" % metrics["tokens_per_second"]) for m in logged)


def test_two_ddp_processes_train_as_one_process_does(full, ddp):
    """Same secret seed: the same Poisson batches (every process draws the global batch and
    keeps its share) and the same noise (rank 0's): only the summation order differs. (No
    training loss curve to compare: a DP run's metrics.json has none.)"""
    tensors = tensor_differences(ddp, full, "model.safetensors")
    worst = {name: d for name, d in tensors.items() if d[0] > TENSOR_ATOL or d[1] > TENSOR_RTOL}
    assert not worst, worst
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in full.iterdir())
    after = metrics_of(ddp)["val_loss_after"], metrics_of(full)["val_loss_after"]
    assert abs(after[0] - after[1]) <= LOSS_ATOL, after
    one, two = metrics_of(full)["privacy"], metrics_of(ddp)["privacy"]
    assert {**two, "world_size": 1} == one and two["world_size"] == 2
    assert metrics_of(ddp)["parallelism"] == "ddp"
    assert metrics_of(ddp)["num_samples"] == metrics_of(full)["num_samples"]


def test_per_sample_clipping_bounds_the_update(tiny, tmp_path):
    """No noise and a clipping norm C of 1e-12: the summed clipped gradient of n sequences,
    divided by the expected batch E, has norm at most C n / E, and AdamW's first step moves
    each weight by lr g / (|g| + eps) <= lr |g| / eps: the whole update is at most
    lr C n / (E eps) (3e-7 here), where an unclipped step moves the weights by about lr per
    weight."""
    out = private_run(tiny, tmp_path / "out", batch_size=8, max_steps=1, dp_noise_multiplier=0.0,
                      dp_max_grad_norm=1e-12)  # fmt: skip
    metrics = metrics_of(out)
    n, expected = SEEN[out].num_samples, metrics["privacy"]["expected_batch_size"]
    assert n > 0 and expected == 8.0 and metrics["num_samples"] == 8  # n: drawn, not released
    assert metrics["privacy"]["epsilon"] is None  # no noise: no finite epsilon
    bound = 0.003 * 1e-12 * n / (expected * ADAM_EPS)
    before = load_file(str(tiny / "model" / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    moved = math.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum().item() for k in before))
    assert 0 < moved <= bound, (moved, bound)


def test_lora_with_a_target_epsilon_and_empty_batches(lora):
    first, again = lora
    metrics = metrics_of(first)
    privacy = metrics["privacy"]
    assert sorted(p.name for p in first.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.json",
    ]  # fmt: skip
    rate = 1 / CZECH_SEQUENCES
    assert privacy["sample_rate"] == rate and privacy["target_epsilon"] == 3.0
    assert privacy["noise_multiplier"] == noise_for_epsilon(3.0, sample_rate=rate, steps=6, delta=rate / 10)
    assert 3.0 - 0.01 <= privacy["epsilon"] <= 3.0
    assert metrics["steps"] == 6 and metrics["num_samples"] == 6  # 1 expected a step
    # a step whose Poisson batch is empty still steps (noise only) but has no loss
    assert len(SEEN[first].step_losses) < 6
    assert all(math.isfinite(x) for x in SEEN[first].step_losses)
    assert not set(TRAINING_LOSSES) & set(metrics)


def test_one_secret_seed_gives_the_same_bytes(lora):
    first, again = lora
    assert (first / "adapter_model.safetensors").read_bytes() == (
        again / "adapter_model.safetensors"
    ).read_bytes()
    tensors = load_file(str(first / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and torch.count_nonzero(t) for name, t in tensors.items())


def test_the_secret_seeds():
    from xffl_tasks.train.config import ConfigError
    from xffl_tasks.train.privacy import secret_seeds

    first, second = secret_seeds({}), secret_seeds({})
    assert first[2] == "urandom" and first[:2] != second[:2]
    assert secret_seeds({"XFFL_DP_SEED": "7"}) == secret_seeds({"XFFL_DP_SEED": "7"})
    assert secret_seeds({"XFFL_DP_SEED": "7"})[2] == "environment"
    for bad in ("-1", "seven", "1" * 20, ""):
        with pytest.raises(ConfigError, match="^XFFL_DP_SEED: expected a whole number"):
            secret_seeds({"XFFL_DP_SEED": bad})
