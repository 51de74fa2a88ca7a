"""The compiled FedAvg kernels (numba) against the same float32 operations done by torch, and
the aggregation with and without them. Starts no process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.xffl_tasks.aggregate.conftest import load_tensors
from xffl_tasks.aggregate import aggregate, fused

pytestmark = pytest.mark.skipif(not fused.KERNELS, reason="numba is not installed")


def reference(previous: torch.Tensor, clients: torch.Tensor, weights: torch.Tensor):
    """The kernels' arithmetic, one torch operation at a time, in float32 (no fused ops)."""
    p = previous.float()
    change = torch.zeros_like(p)
    updates = clients.float() - p
    for update, weight in zip(updates, weights):
        change = change + weight * update
    out = (p + change).to(previous.dtype)
    squares = (updates.double() ** 2).sum(1)
    dots = (updates.double() * change.double()).sum(1)
    return out, squares, dots, float((change.double() ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, fused.BLOCK - 1, 3 * fused.BLOCK + 5])
def test_kernels_match_torch_bit_for_bit(dtype, n):
    generator = torch.Generator().manual_seed(n)
    previous = (torch.randn(n, generator=generator) * 0.02).to(dtype)
    clients = torch.stack(
        [
            (previous.float() + torch.randn(n, generator=generator) * 1e-3 * k).to(dtype)
            for k in (1, 2, 3)
        ]
    )
    weights = torch.tensor([0.5, 0.3, 0.2])
    raw = np.uint16 if dtype == torch.bfloat16 else np.float32
    as_raw = (
        (lambda t: t.view(torch.int16).numpy().view(np.uint16))
        if raw is np.uint16
        else (lambda t: t.numpy())
    )
    stride = n + 7  # rows spaced apart, as in a slot
    rows = np.zeros((3, stride), raw)
    rows[:, :n] = as_raw(clients)
    out = np.empty(n, raw)
    squares, dots = np.zeros(3), np.zeros(3)
    kernel = fused.KERNELS["BF16" if dtype == torch.bfloat16 else "F32"]
    change_squared = kernel(as_raw(previous), rows, weights.numpy(), out, squares, dots)
    expected, expected_squares, expected_dots, expected_change = reference(
        previous, clients, weights
    )
    got = (
        torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        if raw is np.uint16
        else torch.from_numpy(out)
    )
    assert torch.equal(got, expected)
    assert squares == pytest.approx(expected_squares.numpy(), rel=1e-12)
    assert dots == pytest.approx(expected_dots.numpy(), rel=1e-12)
    assert change_squared == pytest.approx(expected_change, rel=1e-12)


def test_non_finite_inputs_show_in_the_squares():
    previous = np.array([0x3F80, 0x3F80], np.uint16)  # bf16 1.0
    clients = np.array([[0x3F80, 0x7FC0], [0x3F80, 0x3F80]], np.uint16)  # a NaN in client 0
    squares, dots = np.zeros(2), np.zeros(2)
    fused.KERNELS["BF16"](
        previous, clients, np.array([0.5, 0.5], np.float32), np.empty(2, np.uint16), squares, dots
    )
    assert not np.isfinite(squares[0]) and np.isfinite(squares[1])


@pytest.mark.parametrize("fixture", ["family", "family_f32"])
def test_the_torch_way_gives_the_same_model_and_statistics(request, fixture, tmp_path, monkeypatch):
    family = request.getfixturevalue(fixture)
    clients = list(family.clients.values())
    with_kernels = aggregate(family.base, clients, tmp_path / "fused")
    monkeypatch.setattr(fused, "KERNELS", {})
    without = aggregate(family.base, clients, tmp_path / "torch")
    ours, theirs = load_tensors(tmp_path / "fused"), load_tensors(tmp_path / "torch")
    for name, tensor in ours.items():
        # torch's matrix product may sum the clients in another order: a float32 rounding
        # apart, so at most one bf16 step where the float32 value sits at a tie
        difference = (tensor.double() - theirs[name].double()).abs()
        spacing = torch.finfo(tensor.dtype).eps * tensor.double().abs().clamp_min(1e-30)
        assert bool((difference <= spacing).all()), name
    assert with_kernels["global_update_norm"] == pytest.approx(
        without["global_update_norm"], rel=1e-5
    )
    for a, b in zip(with_kernels["clients"], without["clients"]):
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-5)
        assert a["cosine_to_aggregate"] == pytest.approx(b["cosine_to_aggregate"], abs=1e-5)
