"""What "FSDP2 trains as DDP does" means, for the unit and the live tests alike.

Both runs see the same sequences in the same order with the same seed, in fp32 on CPUs, so
the only differences are rounding: DDP all-reduces whole gradients while FSDP2
reduce-scatters shards (another summation order), the gradient norm for clipping is summed
per shard then across ranks, and AdamW runs its fused kernel under DDP and the foreach one
over FSDP2's DTensors. Each is a few fp32 ulps per step (fp32's epsilon is 1.2e-7); AdamW's
normalised update carries them on at about ``lr x`` their relative size per step, more where
a gradient is tiny. Measured over 8 steps at learning rate 0.003 (torch
2.13.0+cpu, two gloo processes, one thread each): per-step losses within 4.8e-7 (about one ulp
of a loss near 7); tensors within 3.9e-7 (4e-6 of the tensor's largest value) for full
fine-tuning and 2.0e-6 (2.1e-5) for LoRA, whose new A matrices start with tiny gradients. The
tolerances below are 10 to 20 times those (docs/training.md, "FSDP2 without a GPU").
"""

from __future__ import annotations

import json
from pathlib import Path

# the compared runs: 8 optimizer steps of 2 processes x 4 sequences x 64 tokens of the tiny
# model's Czech corpus, fp32, one thread per process
TWO_PROCESS_FLAGS = (
    "--seq-len", "64", "--batch-size", "4", "--learning-rate", "0.003", "--max-steps", "8",
    "--threads", "1", "--precision", "fp32",
)  # fmt: skip

LOSS_ATOL = 1e-5  # per-step training loss, nats per token
TENSOR_ATOL = 2e-5  # max |ddp - fsdp| over each tensor
TENSOR_RTOL = 2e-4  # ... and relative to that tensor's largest |value|


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def curve_differences(ddp: Path, fsdp: Path) -> list[float]:
    """|ddp - fsdp| of each point of the two runs' ``train_loss_curve``."""
    first, second = metrics_of(ddp), metrics_of(fsdp)
    assert first["train_loss_curve_every"] == second["train_loss_curve_every"] == 1
    assert len(first["train_loss_curve"]) == len(second["train_loss_curve"]) == first["steps"]
    return [abs(a - b) for a, b in zip(first["train_loss_curve"], second["train_loss_curve"])]


def tensor_differences(ddp: Path, fsdp: Path, weights: str) -> dict[str, tuple[float, float]]:
    """``name -> (max |ddp - fsdp|, that / max |ddp|)`` for every tensor of the two runs'
    ``weights`` file; the names, shapes and dtypes must be the same."""
    from safetensors.torch import load_file

    first, second = load_file(str(ddp / weights)), load_file(str(fsdp / weights))
    assert sorted(first) == sorted(second)
    differences = {}
    for name, tensor in first.items():
        other = second[name]
        assert (tensor.shape, tensor.dtype) == (other.shape, other.dtype), name
        largest = tensor.double().abs().max().item()
        difference = (tensor.double() - other.double()).abs().max().item()
        differences[name] = (difference, difference / largest if largest else difference)
    return differences


def assert_trains_as_ddp(ddp: Path, fsdp: Path, weights: str) -> dict[str, float]:
    """The loss curves and the published tensors agree within the tolerances above; returns
    the largest differences found (for the test's record)."""
    curve = curve_differences(ddp, fsdp)
    assert max(curve) <= LOSS_ATOL, curve
    tensors = tensor_differences(ddp, fsdp, weights)
    worst = {name: d for name, d in tensors.items() if d[0] > TENSOR_ATOL or d[1] > TENSOR_RTOL}
    assert not worst, worst
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in fsdp.iterdir())
    return {
        "max_loss_difference": max(curve),
        "max_tensor_difference": max(d for d, _ in tensors.values()),
        "max_tensor_relative_difference": max(r for _, r in tensors.values()),
    }
