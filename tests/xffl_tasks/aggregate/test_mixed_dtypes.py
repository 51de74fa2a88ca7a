"""Every floating dtype averaged in its own precision; integer and bool tensors carried over.

Checkpoints written with the reference safetensors library. Starts no process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.xffl_tasks.aggregate.test_fedavg_checkpoints import ulp
from xffl_tasks.aggregate import aggregate
from xffl_tasks.aggregate.errors import AggregationError

FLOATING = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f32": torch.float32,
    "f64": torch.float64,
    "f8": torch.float8_e4m3fn,
}
WEIGHTS = [1.0, 2.0, 5.0]


def make(folder, seed: int, *, positions: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: (torch.randn(37, 5, generator=generator, dtype=torch.float64) * 2).to(dtype)
        for name, dtype in FLOATING.items()
    }
    tensors["positions"] = torch.arange(positions, positions + 12)
    tensors["mask"] = torch.rand(9, generator=generator) > 0.5
    tensors["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "metrics.json").write_text(json.dumps({"num_samples": 1}))
    return tensors


@pytest.mark.parametrize("chunk_elements", [None, 16])
def test_mixed_dtypes(tmp_path, chunk_elements):
    previous = make(tmp_path / "previous", 0, positions=0)
    clients = [make(tmp_path / f"c{i}", i + 1, positions=100 * (i + 1)) for i in range(3)]
    out = tmp_path / "out"
    report = aggregate(
        tmp_path / "previous",
        [tmp_path / f"c{i}" for i in range(3)],
        out,
        weights=WEIGHTS,
        chunk_elements=chunk_elements,
    )
    ours = load_file(out / "model.safetensors")
    for name in ("positions", "mask", "empty"):
        assert torch.equal(ours[name], previous[name]), name
    total = sum(WEIGHTS)
    for name, dtype in FLOATING.items():
        assert ours[name].dtype == dtype
        reference = sum(w * c[name].double() for w, c in zip(WEIGHTS, clients)) / total
        error = (ours[name].double() - reference).abs()
        scale = torch.stack([t[name].double().abs() for t in [previous, *clients]]).amax(0)
        if dtype == torch.float64:  # computed in float64
            bound = 1e-14 * scale
        elif dtype == torch.float32:  # float32 arithmetic on the inputs' magnitudes
            bound = 8 * ulp(scale, torch.float32)
        else:  # float32 arithmetic, then rounded once to the narrow dtype
            bound = 0.5 * ulp(reference, dtype) + 8 * ulp(scale, torch.float32)
        assert bool((error <= bound).all()), name
    assert report["tensors_aggregated"] == len(FLOATING)
    assert report["elements_aggregated"] == len(FLOATING) * 37 * 5


def test_overflowing_a_narrow_dtype_is_an_error(tmp_path):
    for name in ("previous", "client"):
        (tmp_path / name).mkdir()
    save_file(
        {"h": torch.full((4,), 60000.0, dtype=torch.float16)},
        str(tmp_path / "previous" / "model.safetensors"),
    )
    save_file(
        {"h": torch.full((4,), 65000.0, dtype=torch.float16)},
        str(tmp_path / "client" / "model.safetensors"),
    )
    options = {"server_learning_rate": 2.0, "momentum": 0.0}
    with pytest.raises(AggregationError, match="tensor 'h': the new values overflow F16"):
        aggregate(
            tmp_path / "previous",
            [tmp_path / "client"],
            tmp_path / "out",
            strategy="fedavgm",
            weights=[1],
            options=options,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client", "previous"]


def test_nan_in_a_float8_tensor_is_named(tmp_path):
    for name, value in (("previous", 1.0), ("client", math.nan)):
        (tmp_path / name).mkdir()
        tensor = torch.tensor([1.0, 2.0, value], dtype=torch.float32).to(torch.float8_e4m3fn)
        save_file({"q": tensor}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(
        AggregationError, match=r"client 'client': tensor 'q' holds nan at index \[2\]"
    ):
        aggregate(tmp_path / "previous", [tmp_path / "client"], tmp_path / "out", weights=[1])
