"""Finite outputs: finite inputs that overflow leave out the client to blame (issue 22 item 3).

A client with finite values near 3e38 could make a server-optimiser moment, the global adapter
or its statistics Inf or NaN. Every output is now checked finite before it is written; the
clients to blame are found by leaving them out, largest update first, and the aggregation is
redone without them while ``min_clients`` remain. Literal tensors and hand-made folders, and
the session's real checkpoints (conftest). Starts no process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.adapter import LoraSettings, adapter_key, write_adapter_config
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.finite_output import chunk_culprits, leave_out
from xffl_tasks.aggregate.strategies import make_strategy

EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("magnitudes", "culprits", "expected"),
    [
        ([1.0, 3e38, 2.0], {1}, [1]),
        ([3e38, 1.0, 3e38], {0, 2}, [0, 2]),  # both needed: taken one more at a time
        ([1.0, math.nan, 2.0], {1}, [1]),  # NaN counts as the largest
        ([5.0, 5.0], {1}, None),  # ties by position: 0 goes first, then only 1 is left
        ([1.0], {0}, None),  # one client left cannot be blamed
    ],
)
def test_leave_out_takes_the_largest_first_and_keeps_one(magnitudes, culprits, expected):
    def finite_without(out: frozenset[int]) -> bool:
        return culprits <= out

    assert leave_out(magnitudes, finite_without) == expected


def test_the_client_whose_values_overflow_the_adam_moment_is_blamed():
    # d = (1 + 2 + 3e38) / 3 = 1e38: d * d overflows float32, so the second moment is Inf
    found = chunk_culprits(
        make_strategy("fedadam", num_clients=3),
        torch.zeros(2),
        [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([3e38, 0.0])],
        [1 / 3, 1 / 3, 1 / 3],
        [1.0, 1.0, 1.0],
        [torch.zeros(2), torch.zeros(2)],
        torch.float32,
    )
    assert found == {2: pytest.approx(3e38, rel=1e-7)}


def test_an_overflow_of_the_server_options_blames_no_client():
    # fedavgm, learning rate 2: (60000 - 60000) + 2 * 5000 = 70000 overflows float16 with
    # either client alone too
    found = chunk_culprits(
        make_strategy(
            "fedavgm", options={"server_learning_rate": 2.0, "momentum": 0.0}, num_clients=2
        ),
        torch.full((2,), 60000.0),
        [torch.full((2,), 65000.0).half(), torch.full((2,), 65000.0).half()],
        [0.5, 0.5],
        [1.0, 1.0],
        [torch.zeros(2)],
        torch.float16,
    )
    assert found is None


def put(folder: Path, tensor: str, value: float) -> None:
    index = folder / "model.safetensors.index.json"
    file = (
        json.loads(index.read_text())["weight_map"][tensor]
        if index.exists()
        else "model.safetensors"
    )
    tensors = load_file(folder / file)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor][0, 0] = value
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def test_a_full_model_client_near_3e38_is_left_out_of_fedadam(family_copy, tmp_path):
    put(family_copy.clients["site2"], EMBED, 3e38)
    clients = list(family_copy.clients.values())
    report = aggregate(
        family_copy.base, clients, tmp_path / "out", strategy="fedadam", min_clients=2,
        chunk_elements=4096,
    )  # fmt: skip
    assert [c["name"] for c in report["clients"]] == ["site1", "site3"]
    assert report["rejected"]["site2"].startswith(
        f"client 'site2': tensor {EMBED!r}: its values (up to 3.004"
    )
    assert report["rejected"]["site2"].endswith(
        "from the previous model's) make the fedadam output non-finite (the fedadam server state "
        "is not finite)"
    )
    assert math.isfinite(report["global_update_norm"])
    aggregate(
        family_copy.base, [clients[0], clients[2]], tmp_path / "two", strategy="fedadam",
        chunk_elements=4096,
    )  # fmt: skip
    for path in sorted((tmp_path / "two").rglob("*.safetensors")):
        relative = path.relative_to(tmp_path / "two")
        assert path.read_bytes() == (tmp_path / "out" / relative).read_bytes(), relative


def test_a_full_model_overflow_with_too_few_clients_left_is_an_error(family_copy, tmp_path):
    put(family_copy.clients["site2"], EMBED, 3e38)
    with pytest.raises(AggregationError) as raised:
        aggregate(family_copy.base, list(family_copy.clients.values()), tmp_path / "out",
                  strategy="fedadam")  # fmt: skip
    assert str(raised.value).startswith("only 2 of 3 clients passed the checks, min_clients is 3")
    assert not (tmp_path / "out").exists()


# -- adapters ----------------------------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"
A, B = adapter_key(MODULE, "A"), adapter_key(MODULE, "B")


def adapter(folder: Path, a, b, samples: int) -> Path:
    folder.mkdir(parents=True)
    save_file({A: torch.tensor(a), B: torch.tensor(b)}, str(folder / "adapter_model.safetensors"))
    write_adapter_config(folder, LoraSettings(r=1, alpha=2.0, target_modules=("q_proj",)))
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.mark.parametrize(
    ("strategy", "options", "inputs"),
    [
        # the best rank-1 factors of 0.75 * (3e38 1_2)(3e38 1_32)^T balance sqrt(sigma) on
        # both sides: B's entries are 3e38 * sqrt(0.75) * (32 / 2) ** 0.25 = 5.2e38, beyond float32
        ("lora-svd", {}, ([[3e38] * 32], [[3e38], [3e38]])),
        # 0 + 2 * (0.75 * 3e38 + 0.25 * 1) = 4.5e38, beyond float32
        ("lora-fedavg", {"server_learning_rate": 2.0}, ([[3e38] * 32], [[3e38], [3e38]])),
    ],
)
def test_an_adapter_near_3e38_is_left_out_and_the_rest_aggregated(
    tmp_path, strategy, options, inputs
):
    previous = adapter(tmp_path / "prev", [[0.0] * 32], [[0.0], [0.0]], 1)
    good = adapter(tmp_path / "good", [[1.0] + [0.0] * 31], [[1.0], [0.0]], 100)
    hostile = adapter(tmp_path / "hostile", *inputs, 300)
    report = aggregate(previous, [good, hostile], tmp_path / "out", strategy=strategy,
                       options=options, min_clients=1)  # fmt: skip
    assert [c["name"] for c in report["clients"]] == ["good"]
    assert report["rejected"]["hostile"].startswith("client 'hostile': its adapter (update norm ")
    assert f"makes the {strategy} (" in report["rejected"]["hostile"]
    assert "output non-finite" in report["rejected"]["hostile"]
    assert math.isfinite(report["global_update_norm"])
    alone = aggregate(previous, [good], tmp_path / "alone", strategy=strategy, options=options)
    assert alone["global_update_norm"] == report["global_update_norm"]
    assert (tmp_path / "alone" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "out" / "adapter_model.safetensors"
    ).read_bytes()


def test_an_adapter_overflow_with_no_client_to_spare_is_an_error(tmp_path):
    previous = adapter(tmp_path / "prev", [[0.0] * 32], [[0.0], [0.0]], 1)
    hostile = adapter(tmp_path / "hostile", [[3e38] * 32], [[3e38], [3e38]], 300)
    with pytest.raises(AggregationError, match="the lora-svd .* output is not finite"):
        aggregate(previous, [hostile], tmp_path / "out", strategy="lora-svd")
    assert not (tmp_path / "out").exists()
