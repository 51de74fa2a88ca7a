"""Decisions about device, precision, parallelism, threads and optimizer kernels. Pure logic;
the GPU cases patch ``torch.cuda``'s answers (this machine has no GPU). Starts nothing."""

from __future__ import annotations

import pytest
import torch

from xffl_tasks.launch import DistributedLaunch
from xffl_tasks.train.config import ConfigError, TrainingConfig
from xffl_tasks.train.distributed import default_threads, resolve_runtime
from xffl_tasks.train.loop import optimizer_implementation

ALONE = DistributedLaunch(0, 0, 1, 1, "127.0.0.1", 29500, "single")
RANK_5_OF_8 = DistributedLaunch(5, 1, 8, 4, "n1", 29500, "slurm")


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_cpu_defaults():
    runtime = resolve_runtime(TrainingConfig(device="cpu"), ALONE)
    assert (runtime.device, runtime.precision, runtime.parallelism) == (
        torch.device("cpu"),
        "fp32",
        "none",
    )
    assert resolve_runtime(TrainingConfig(device="cpu"), RANK_5_OF_8).parallelism == "ddp"
    assert (
        resolve_runtime(
            TrainingConfig(device="cpu", parallelism="fsdp", precision="bf16"), RANK_5_OF_8
        ).compute_dtype
        == torch.bfloat16
    )


def test_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: cuda was asked for, but no GPU is visible"):
        resolve_runtime(TrainingConfig(device="cuda"), ALONE)


def test_gpus_get_fsdp_bf16_and_the_local_rank(four_gpus):
    runtime = resolve_runtime(TrainingConfig(), RANK_5_OF_8)
    assert (runtime.device, runtime.precision, runtime.parallelism) == (
        torch.device("cuda", 1),
        "bf16",
        "fsdp",
    )
    assert (
        resolve_runtime(
            TrainingConfig(parallelism="ddp", precision="fp32"), RANK_5_OF_8
        ).parallelism
        == "ddp"
    )


def test_one_visible_gpu_per_task(four_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_runtime(TrainingConfig(), RANK_5_OF_8).device == torch.device("cuda", 0)


def test_threads_from_slurm():
    assert default_threads({}, ALONE) is None
    assert default_threads({"SLURM_CPUS_PER_TASK": "8"}, RANK_5_OF_8) == 8
    torchrun = DistributedLaunch(1, 1, 8, 4, "n1", 29500, "torchrun")
    assert default_threads({"SLURM_CPUS_PER_TASK": "32"}, torchrun) == 8
    assert default_threads({"SLURM_CPUS_PER_TASK": "2"}, torchrun) == 1
    assert default_threads({"SLURM_CPUS_PER_TASK": "x"}, ALONE) is None


@pytest.mark.parametrize(
    ("device", "parallelism", "expected"),
    [
        ("cuda", "none", {"fused": True}),
        ("cuda", "ddp", {"fused": True}),
        ("cuda", "fsdp", {}),
        ("cpu", "ddp", {"fused": True}),
        ("cpu", "fsdp", {}),
    ],
)
def test_optimizer_kernels_are_a_valid_adamw_choice(device, parallelism, expected):
    from xffl_tasks.train.distributed import Runtime

    options = optimizer_implementation(Runtime(ALONE, torch.device(device), "fp32", parallelism))
    assert options == expected
    # AdamW accepts the combination (fused AdamW also runs on CPU tensors).
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.ones(3)
    torch.optim.AdamW([parameter], lr=0.1, **options).step()
    assert parameter.detach().lt(1).all()
