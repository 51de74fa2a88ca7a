"""The clients are aggregated in the order of their names, whatever order they are given in:
the same clients give the same bytes (floating-point sums depend on their order). Literal
data where the order shows in float32, and the session's checkpoint families. Starts no process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.aggregate import aggregate, fused
from xffl_tasks.aggregate.client_order import by_name, name_order

from .test_lora_aggregation import adapter

#: Updates whose float32 sum depends on the order: with weights 1/3 each,
#: (big + small) - big is 0 (the small one is lost), (big - big) + small is not.
UPDATES = {"a-big": 1e8, "b-minus-big": -1e8, "c-small": 1.0}
ORDERS = [
    ["a-big", "b-minus-big", "c-small"],
    ["a-big", "c-small", "b-minus-big"],
    ["c-small", "b-minus-big", "a-big"],
]


def test_name_order_is_by_code_point():
    assert name_order(["site2", "site10", "site1"]) == [2, 1, 0]
    assert name_order(["b", "B", "a"]) == [1, 2, 0]  # no locale: capitals first
    assert by_name(["cz", "it", "de"], [Path("/c"), Path("/i"), Path("/d")], [2.0, 1.0, 3.0]) == (
        ["cz", "de", "it"],
        [Path("/c"), Path("/d"), Path("/i")],
        [2.0, 3.0, 1.0],
    )
    assert by_name(["y", "x"], [Path("/y"), Path("/x")]) == (
        ["x", "y"],
        [Path("/x"), Path("/y")],
        None,
    )


def literal_round(root: Path) -> tuple[Path, dict[str, Path]]:
    previous = root / "previous"
    previous.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(previous / "model.safetensors"), metadata={"format": "pt"})
    clients = {}
    for name, update in UPDATES.items():
        clients[name] = root / name
        clients[name].mkdir()
        save_file({"w": torch.full((4,), update)}, str(clients[name] / "model.safetensors"))
        (clients[name] / "metrics.json").write_text(json.dumps({"num_samples": 10}))
    return previous, clients


def test_the_float32_sum_depends_on_the_order_of_the_clients():
    """What the sorting guards against: the kernel itself sums in the order it is given."""
    if "F32" not in fused.KERNELS:
        pytest.skip("numba is not installed")
    weights = np.full(3, 1 / 3, np.float32)
    results = []
    for order in (ORDERS[0], ORDERS[1]):
        rows = np.array([[UPDATES[name]] * 4 for name in order], np.float32)
        out = np.empty(4, np.float32)
        fused.KERNELS["F32"](np.zeros(4, np.float32), rows, weights, out, np.zeros(3), np.zeros(3))
        results.append(out[0])
    assert results == [np.float32(1 / 3), np.float32(0.0)]


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam"])
def test_any_order_of_the_clients_gives_the_name_order_result(tmp_path, strategy):
    previous, clients = literal_round(tmp_path / "in")
    outputs = []
    for index, order in enumerate(ORDERS):
        out = tmp_path / f"out{index}"
        report = aggregate(previous, [clients[n] for n in order], out, strategy=strategy)
        assert [c["name"] for c in report["clients"]] == sorted(UPDATES)
        outputs.append(
            {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.safetensors")}
        )
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    if strategy != "fedadam":  # previous + (1e8 - 1e8 + 1) / 3, summed in name order
        assert (
            load_file(str(tmp_path / "out0" / "model.safetensors"))["w"].tolist()
            == [np.float32(1 / 3)] * 4
        )


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file but the report (which holds paths and seconds)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "aggregation.json"
    }


@pytest.mark.parametrize("precision", ["bf16", "f32"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedyogi"])
def test_checkpoints_in_two_orders_give_identical_files(
    family, family_f32, tmp_path, precision, strategy
):
    chosen = family if precision == "bf16" else family_f32
    names = list(chosen.clients)
    forward = aggregate(
        chosen.base, [chosen.clients[n] for n in names], tmp_path / "forward", strategy=strategy
    )
    backward = aggregate(
        chosen.base, [chosen.clients[n] for n in reversed(names)], tmp_path / "backward",
        strategy=strategy, names=list(reversed(names)),
    )  # fmt: skip
    assert digests(tmp_path / "forward") == digests(tmp_path / "backward")
    assert forward["output_files"] == backward["output_files"]
    assert [c["name"] for c in backward["clients"]] == sorted(names)


@pytest.mark.parametrize("strategy", ["lora-fedavg", "lora-svd"])
def test_adapters_in_two_orders_give_identical_files(tmp_path, strategy):
    previous = adapter(tmp_path / "prev", [[0.0, 0.0]], [[0.0], [0.0]])
    clients = [
        adapter(tmp_path / "it", [[1e8, 0.5]], [[1.0], [1e-8]], samples=3),
        adapter(tmp_path / "cz", [[-1e8, 1.0]], [[1.0], [2.0]], samples=3),
        adapter(tmp_path / "de", [[1.0, -0.25]], [[3.0], [1e8]], samples=3),
    ]
    aggregate(previous, clients, tmp_path / "forward", strategy=strategy)
    report = aggregate(previous, clients[::-1], tmp_path / "backward", strategy=strategy)
    assert digests(tmp_path / "forward") == digests(tmp_path / "backward")
    assert [c["name"] for c in report["clients"]] == ["cz", "de", "it"]
