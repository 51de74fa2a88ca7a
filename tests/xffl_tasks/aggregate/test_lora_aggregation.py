"""Aggregating LoRA adapter folders with the engine's entry point and CLI: hand-computed
results, aggregation.json, client rejection (NaN/Inf, mismatched tensors or configs), server
momentum. Adapters are written by hand (one layer, r = 1). Starts no process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.adapter import LoraSettings, adapter_key, write_adapter_config
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.__main__ import main

MODULE = "model.layers.0.self_attn.q_proj"
A, B = adapter_key(MODULE, "A"), adapter_key(MODULE, "B")
T = torch.tensor


def adapter(
    folder: Path, a, b, *, samples: int | None = None, r: int = 1, alpha: float = 2.0
) -> Path:
    folder.mkdir(parents=True)
    save_file(
        {A: T(a), B: T(b)}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    write_adapter_config(folder, LoraSettings(r=r, alpha=alpha, target_modules=("q_proj",)))
    if samples is not None:
        (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.fixture
def round_(tmp_path):
    """Previous adapter and two clients on orthogonal rank-1 directions, weights 3:1."""
    previous = adapter(tmp_path / "prev", [[0.0, 0.0]], [[0.0], [0.0]])
    one = adapter(tmp_path / "it", [[1.0, 0.0]], [[1.0], [0.0]], samples=300)
    two = adapter(tmp_path / "cz", [[0.0, 1.0]], [[0.0], [1.0]], samples=100)
    return tmp_path, previous, [one, two]


def test_lora_fedavg_through_the_cli(round_):
    tmp, previous, clients = round_
    out = tmp / "out"
    assert (
        main(
            [
                "--previous",
                str(previous),
                "--out",
                str(out),
                "--strategy",
                "lora-fedavg",
                *map(str, clients),
            ]
        )
        == 0
    )
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors[A].tolist() == [[0.75, 0.25]]
    assert tensors[B].tolist() == [[0.75], [0.25]]
    report = json.loads((out / "aggregation.json").read_text())
    assert report["strategy"] == "lora-fedavg" and report["exact"] is False
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "aggregation.json",
    ]
    # in name order: cz (100 samples), then it (300)
    assert [(c["name"], c["normalized_weight"]) for c in report["clients"]] == [
        ("cz", 0.25),
        ("it", 0.75),
    ]


def test_lora_svd_writes_the_best_rank_r_product_and_the_residual(round_):
    tmp, previous, clients = round_
    report = aggregate(previous, clients, tmp / "out", strategy="lora-svd")
    assert report["strategy"] == "lora-svd" and report["exact"] is False  # rank r, not exact
    tensors = load_file(str(tmp / "out" / "adapter_model.safetensors"))
    assert torch.allclose(tensors[B] @ tensors[A], T([[0.75, 0.0], [0.0, 0.0]]), atol=1e-7)
    assert report["layers"][MODULE]["residual"] == pytest.approx(1 / math.sqrt(10))
    assert report["max_residual"] == pytest.approx(1 / math.sqrt(10))
    assert report["adapter"] == {
        "r": 1,
        "alpha": 2.0,
        "scaling": 2.0,
        "target_modules": ["q_proj"],
        "layers": 1,
    }
    # norms in the merged weights' space: scaling * (B A - B0 A0); the change is 2 * diag(0.75, 0)
    assert report["global_update_norm"] == pytest.approx(1.5)
    clients_by_name = {c["name"]: c for c in report["clients"]}
    assert clients_by_name["it"]["update_norm"] == pytest.approx(2.0)
    assert clients_by_name["it"]["cosine_to_aggregate"] == pytest.approx(1.0)
    assert clients_by_name["cz"]["cosine_to_aggregate"] == pytest.approx(0.0, abs=1e-12)
    assert set(report["output_files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert report["clients"][0]["files"].keys() == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    }


def test_lora_frozen_a_is_exact_and_refuses_a_client_that_moved_a(tmp_path):
    previous = adapter(tmp_path / "prev", [[1.0, 2.0]], [[0.0], [0.0]])
    one = adapter(tmp_path / "it", [[1.0, 2.0]], [[1.0], [3.0]], samples=1)
    two = adapter(tmp_path / "cz", [[1.0, 2.0]], [[5.0], [-1.0]], samples=1)
    moved = adapter(tmp_path / "fr", [[1.5, 2.0]], [[1.0], [1.0]], samples=1)
    report = aggregate(
        previous, [one, two, moved], tmp_path / "out", strategy="lora-frozen-a", min_clients=2
    )
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert tensors[A].tolist() == [[1.0, 2.0]]
    assert tensors[B].tolist() == [[3.0], [1.0]]
    assert "differs from the round's A" in report["rejected"]["fr"]
    assert report["exact"] is True


@pytest.mark.parametrize(
    "bad, reason",
    [
        (
            lambda d: adapter(d, [[float("nan"), 0.0]], [[0.0], [0.0]], samples=5),
            "holds NaN at [0, 0]",
        ),
        (
            lambda d: adapter(d, [[0.0, 0.0]], [[float("inf")], [0.0]], samples=5),
            "holds Inf at [0, 0]",
        ),
        (lambda d: adapter(d, [[0.0, 0.0, 0.0]], [[0.0], [0.0]], samples=5), "has shape [1, 3]"),
        (
            lambda d: adapter(d, [[0.0, 0.0]], [[0.0], [0.0]], samples=5, alpha=4.0),
            "differs from the previous",
        ),
        (
            lambda d: adapter(
                d, [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], samples=5, r=2
            ),
            "differs",
        ),
        (lambda d: adapter(d, [[0.0, 0.0]], [[0.0], [0.0]]), "metrics.json"),
    ],
)
def test_a_bad_client_is_left_out_with_its_reason(round_, bad, reason):
    tmp, previous, clients = round_
    strange = bad(tmp / "fr")
    report = aggregate(
        previous, [*clients, strange], tmp / "out", strategy="lora-svd", min_clients=2
    )
    assert reason in report["rejected"]["fr"]
    assert [c["name"] for c in report["clients"]] == ["cz", "it"]
    with pytest.raises(AggregationError, match="only 2 of 3 clients"):
        aggregate(previous, [*clients, strange], tmp / "out2", strategy="lora-svd")
    assert not (tmp / "out2").exists()


def test_a_pickle_or_a_foreign_tensor_is_refused(round_):
    tmp, previous, clients = round_
    (clients[0] / "adapter_model.bin").write_bytes(b"x")
    report = aggregate(previous, clients, tmp / "out", strategy="lora-fedavg", min_clients=1)
    assert "pickle" in report["rejected"]["it"]
    odd = tmp / "odd"
    odd.mkdir()
    save_file(
        {"model.embed_tokens.weight": torch.zeros(2, 2)}, str(odd / "adapter_model.safetensors")
    )
    write_adapter_config(odd, LoraSettings(r=1, alpha=2.0, target_modules=("q_proj",)))
    with pytest.raises(AggregationError, match="not a LoRA A or B"):
        aggregate(odd, clients[1:], tmp / "out3", strategy="lora-fedavg")


def test_server_momentum_chains_over_rounds_and_options_are_checked(round_):
    tmp, previous, clients = round_
    options = {"momentum": 0.5, "server_learning_rate": 1.0}
    first = aggregate(previous, clients, tmp / "g1", strategy="lora-fedavg", options=options)
    assert first["server_state_rounds"] == 1
    assert (tmp / "g1" / "server_state" / "momentum.safetensors").is_file()
    # round 2: clients equal to g1 give d = 0; the momentum (d1 = g1 - 0) moves on by 0.5 d1
    again = [
        adapter(tmp / name, [[0.75, 0.25]], [[0.75], [0.25]], samples=1) for name in ("it2", "cz2")
    ]
    second = aggregate(tmp / "g1", again, tmp / "g2", strategy="lora-fedavg", options=options)
    assert second["server_state_rounds"] == 2
    assert load_file(str(tmp / "g2" / "adapter_model.safetensors"))[A].tolist() == [[1.125, 0.375]]
    with pytest.raises(AggregationError, match="not an option of lora-svd"):
        aggregate(previous, clients, tmp / "g3", strategy="lora-svd", options={"momentum": 0.5})
    with pytest.raises(AggregationError, match="written by 'lora-fedavg'"):
        aggregate(
            tmp / "g1", again, tmp / "g4", strategy="lora-frozen-a", options={"momentum": 0.5}
        )


def test_svd_with_a_server_learning_rate(round_):
    tmp, previous, clients = round_
    aggregate(
        previous, clients, tmp / "out", strategy="lora-svd", options={"server_learning_rate": 0.5}
    )
    tensors = load_file(str(tmp / "out" / "adapter_model.safetensors"))
    assert torch.allclose(tensors[B] @ tensors[A], T([[0.375, 0.0], [0.0, 0.0]]), atol=1e-7)


RENAMED = "lora-exact was renamed lora-svd .*not exact.*for exact aggregation use lora-stacked"


def test_the_old_name_lora_exact_is_refused_pointing_to_lora_svd_and_lora_stacked(round_):
    tmp, previous, clients = round_
    with pytest.raises(AggregationError, match=RENAMED):
        aggregate(previous, clients, tmp / "out", strategy="lora-exact")
    assert not (tmp / "out").exists()
    assert main(["--previous", str(previous), "--out", str(tmp / "out"), "--strategy", "lora-exact",
                 *map(str, clients)]) == 2  # fmt: skip
    from xffl_tasks.aggregate.lora import aggregate_adapters

    with pytest.raises(AggregationError, match=RENAMED):
        aggregate_adapters(previous, clients, tmp / "out", strategy="lora-exact")
