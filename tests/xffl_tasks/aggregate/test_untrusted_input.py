"""A facility's outputs are untrusted: hostile metrics, headers and weights are refused by name.

Each case of issue 12 item 4: a bounded, schema-checked metrics.json; safetensors headers with
limits on nesting and ``__metadata__``; exact weights with an optional cap on any client's
share; a client that fails its checks is left out (``rejected``) while ``min_clients`` remain.
Runs on copies of the session's real checkpoints (conftest); starts no process.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.aggregate import aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.metrics import MAX_METRICS_BYTES, MetricsError, parse_metrics
from xffl_tasks.aggregate.safetensors_format import HeaderError, parse_header
from xffl_tasks.aggregate.weights import normalize

EMBED = "model.embed_tokens.weight"


def shard_of(folder, tensor):
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][tensor]
    return folder / "model.safetensors"


def put(folder, tensor, change):
    path = shard_of(folder, tensor)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def metrics(**fields) -> bytes:
    return json.dumps({"num_samples": 10, **fields}).encode()


# -- metrics.json ------------------------------------------------------------------------


def test_metrics_larger_than_the_limit_are_refused_unparsed():
    data = metrics(data="x" * MAX_METRICS_BYTES)
    with pytest.raises(
        MetricsError, match=r"^client 'site1': metrics.json is larger than 65536 bytes$"
    ):
        parse_metrics(data, "site1")


def test_deeply_nested_metrics_are_refused_before_parsing():
    data = b"{\"num_samples\": 1, \"x\": " + b"[" * 20_000 + b"]" * 20_000 + b"}"
    with pytest.raises(
        MetricsError, match=r"^client 'site1': metrics.json nests deeper than 4 levels$"
    ):
        parse_metrics(data, "site1")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("val_loss_before", "abc", "'abc' is not a number"),
        ("val_loss_after", [1.0], "[1.0] is not a number"),
        ("train_loss", 10**400, "is not a finite number"),
        ("num_samples", 10**300, "is not a whole number from 1 to 1000000000000"),
        ("num_samples", 1e300, "1e+300 is not a whole number from 1 to 1000000000000"),
        ("num_tokens", -1, "-1 is not a whole number from 0 to"),
        ("device", "d" * 5000, "is not a string of at most 1024 characters"),
        ("hyperparameters", {"lr": {"x": 1}}, None),
    ],
)
def test_fields_outside_the_schema_are_named(field, value, problem):
    data = json.dumps({"num_samples": 10, field: value}).encode()
    with pytest.raises(MetricsError) as raised:
        parse_metrics(data, "site2")
    assert str(raised.value).startswith(f"client 'site2': metrics.json {field}")
    assert raised.value.field.startswith(field) and raised.value.client == "site2"
    if problem:
        assert problem in str(raised.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_losses_are_refused(text):
    data = b'{"num_samples": 3, "val_loss_before": ' + text.encode() + b"}"
    with pytest.raises(
        MetricsError, match=r"metrics.json val_loss_before .* is not a finite number"
    ):
        parse_metrics(data, "site1")


def test_an_integer_of_thousands_of_digits_is_a_refusal_not_a_value_error():
    data = b'{"num_samples": ' + b"9" * 5000 + b"}"
    with pytest.raises(MetricsError, match=r"^client 'site1': metrics.json is not valid JSON"):
        parse_metrics(data, "site1")


def test_known_fields_are_kept_typed_and_unknown_ones_dropped():
    data = metrics(val_loss_before=2, device="cpu", extra="x" * 1000, hyperparameters={"lr": 1e-3})
    assert parse_metrics(data, "s") == {
        "num_samples": 10,
        "val_loss_before": 2.0,
        "device": "cpu",
        "hyperparameters": {"lr": 1e-3},
    }


# -- safetensors headers -----------------------------------------------------------------


def test_a_header_nested_200k_deep_is_refused_before_parsing():
    text = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(HeaderError, match=r"^header nests deeper than 3 levels$"):
        parse_header(text, 0)


def test_large_metadata_is_refused():
    text = json.dumps({"__metadata__": {f"k{i}": "v" * 1000 for i in range(70)}}).encode()
    with pytest.raises(
        HeaderError, match=r"^__metadata__ holds 70\d+ bytes of strings, more than 65536$"
    ):
        parse_header(text, 0)


def test_nested_metadata_is_refused():
    with pytest.raises(HeaderError, match="__metadata__ is not a map of strings"):
        parse_header(b'{"__metadata__": {"a": {"b": "c"}}}', 0)


def test_a_client_with_a_deep_header_is_rejected_naming_the_file(family_copy, tmp_path):
    path = shard_of(family_copy.clients["site2"], EMBED)
    size = path.stat().st_size
    text = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * size)
    with pytest.raises(AggregationError) as raised:
        aggregate(family_copy.base, list(family_copy.clients.values()), tmp_path / "out")
    assert f"client 'site2': {path.name}: header nests deeper than 3 levels" in str(raised.value)


# -- weights -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "share", "expected"),
    [
        ([1000, 1], 0.6, [0.6, 0.4]),
        ([5, 3, 2], 0.4, [0.4, 0.36, 0.24]),
        ([100, 1, 1], 0.5, [0.5, 0.25, 0.25]),
        ([98, 1, 1], 0.4, [0.4, 0.3, 0.3]),  # two rounds: the others both reach the cap
        ([1, 1, 1], 0.5, [1 / 3, 1 / 3, 1 / 3]),
        ([10**12, 1], None, [1 - 1e-12 / (1 + 1e-12), 1 / (10**12 + 1)]),
        ([0.1, 0.2], None, [1 / 3, 2 / 3]),
    ],
)
def test_normalize_is_exact_and_caps_shares(weights, share, expected):
    assert normalize(weights, share) == pytest.approx(expected, rel=1e-15, abs=0)


def test_a_cap_no_weighting_can_meet_is_an_error():
    with pytest.raises(AggregationError, match=r"max_weight_share 0.3 is infeasible for 3 clients"):
        normalize([1, 1, 1], 0.3)


# -- rejection ---------------------------------------------------------------------------


def _nan(tensors):
    tensors[EMBED] = tensors[EMBED].clone()
    tensors[EMBED][3, 5] = math.nan


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_a_client_with_nan_is_left_out_when_the_others_meet_min_clients(
    family_copy, tmp_path, strategy
):
    put(family_copy.clients["site2"], EMBED, _nan)
    clients = list(family_copy.clients.values())
    options = None
    report = aggregate(family_copy.base, clients, tmp_path / "out", strategy=strategy,
                       options=options, min_clients=2, chunk_elements=4096)  # fmt: skip
    assert [c["name"] for c in report["clients"]] == ["site1", "site3"]
    assert set(report["rejected"]) == {"site2"}
    assert (
        "client 'site2': tensor 'model.embed_tokens.weight' holds nan at index [3, 5]"
        in (report["rejected"]["site2"])
    )
    expected = aggregate(family_copy.base, [clients[0], clients[2]], tmp_path / "two",
                         strategy=strategy, options=options)  # fmt: skip
    for name, tensor in load_tensors_of(tmp_path / "two").items():
        assert torch.equal(load_tensors_of(tmp_path / "out")[name], tensor), name
    assert expected["clients"][0]["normalized_weight"] == report["clients"][0]["normalized_weight"]
    written = json.loads((tmp_path / "out" / "aggregation.json").read_text())
    assert written["rejected"] == report["rejected"]


def load_tensors_of(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_bad_metrics_and_a_wrong_shape_are_rejected_by_name(family_copy, tmp_path):
    (family_copy.clients["site1"] / "metrics.json").write_text('{"num_samples": "many"}')
    put(family_copy.clients["site3"], EMBED, lambda t: t.update({EMBED: t[EMBED][:-1].clone()}))
    clients = list(family_copy.clients.values())
    with pytest.raises(AggregationError) as raised:
        aggregate(family_copy.base, clients, tmp_path / "out", min_clients=2)
    message = str(raised.value)
    assert message.startswith("only 1 of 3 clients passed the checks, min_clients is 2; ")
    assert "client 'site1': metrics.json num_samples 'many' is not a whole number" in message
    assert "client 'site3': tensor 'model.embed_tokens.weight' has shape [255, 64]" in message
    assert not (tmp_path / "out").exists()
    report = aggregate(family_copy.base, clients, tmp_path / "out", min_clients=1)
    assert [c["name"] for c in report["clients"]] == ["site2"]
    assert report["clients"][0]["normalized_weight"] == 1.0


def test_max_weight_share_caps_the_recorded_weights(family_copy, tmp_path):
    clients = list(family_copy.clients.values())  # 100, 300, 600 samples
    report = aggregate(family_copy.base, clients, tmp_path / "out", max_weight_share=0.5)
    assert [c["normalized_weight"] for c in report["clients"]] == [0.125, 0.375, 0.5]
    assert report["max_weight_share"] == 0.5 and report["rejected"] == {}


def test_huge_num_samples_no_longer_take_the_whole_average(family_copy, tmp_path):
    (family_copy.clients["site3"] / "metrics.json").write_text(
        '{"num_samples": 1' + "0" * 300 + "}"
    )
    clients = list(family_copy.clients.values())
    report = aggregate(family_copy.base, clients, tmp_path / "out", min_clients=2)
    assert "client 'site3': metrics.json num_samples 1000" in report["rejected"]["site3"]
    assert [c["normalized_weight"] for c in report["clients"]] == [0.25, 0.75]
