"""``check_client_folder``: the pull refuses what the aggregation would refuse, by the same code.

Issue 22: a lone surrogate escape in a header's ``__metadata__`` passed the pull, then the
safetensors library refused it during the aggregation; unclosed brackets and huge integers
escaped as RecursionError and ValueError; the index was read unbounded. Each case is checked
at the pull (``check_client_folder``) and in the aggregation (the client left out, with the
same message, while the quorum holds). Real checkpoints (conftest) and hand-made adapters.
Starts no process.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xffl_tasks.adapter import LoraSettings, adapter_key, write_adapter_config
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.client_check import InputModelError, check_client_folder
from xffl_tasks.aggregate.metrics import MetricsError
from xffl_tasks.aggregate.model_folder import MAX_INDEX_BYTES

INDEX = "model.safetensors.index.json"


def pull_error(previous: Path, client: Path, name: str, **options) -> str:
    with pytest.raises(AggregationError) as raised:
        check_client_folder(previous, client, name=name, **options)
    return str(raised.value)


def rewrite_header(path: Path, change) -> None:
    """Rewrites a safetensors file's JSON header through ``change`` (bytes -> bytes)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = change(raw[8 : 8 + length])
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length :])


def with_surrogate_metadata(header: bytes) -> bytes:
    parsed = json.loads(header)
    text = json.dumps({k: v for k, v in parsed.items() if k != "__metadata__"})
    return b'{"__metadata__": {"note": "\\ud800"}, ' + text[1:].encode()


# -- full models -------------------------------------------------------------------------


def test_a_valid_client_gives_its_metrics(family):
    metrics = check_client_folder(family.base, family.clients["site3"], name="site3", adapter=False)
    assert metrics == {"num_samples": 600, "num_tokens": 30000}


def test_a_lone_surrogate_in_a_header_is_refused_at_the_pull_and_left_out_by_the_aggregation(
    family_copy, tmp_path
):
    shard = family_copy.clients["site2"] / "model.safetensors"
    rewrite_header(shard, with_surrogate_metadata)
    message = pull_error(family_copy.base, family_copy.clients["site2"], "site2", adapter=False)
    assert message == (
        "client 'site2': model.safetensors: header has a lone surrogate escape in the string "
        "'\\ud800' (not Unicode text)"
    )
    clients = list(family_copy.clients.values())
    report = aggregate(family_copy.base, clients, tmp_path / "out", min_clients=2)
    assert report["rejected"] == {"site2": message}  # the same check, the same words
    assert [c["name"] for c in report["clients"]] == ["site1", "site3"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"weight_map": ' + b"[" * 100_000, "is not valid JSON (its brackets do not balance)"),
        (b'{"weight_map": {}, "n": ' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
        (b'{"weight_map": {"a\\udc00": "x.safetensors"}}', "has a lone surrogate escape"),
        (b'{"weight_map": {}, "weight_map": {}}', "key 'weight_map' appears twice"),
    ],
)
def test_a_hostile_index_is_a_refusal_naming_the_file(family_copy, tmp_path, text, problem):
    (family_copy.clients["site1"] / INDEX).write_bytes(text)
    message = pull_error(family_copy.base, family_copy.clients["site1"], "site1", adapter=False)
    assert message.startswith(f"client 'site1': {INDEX} ") and problem in message
    report = aggregate(
        family_copy.base, list(family_copy.clients.values()), tmp_path / "out", min_clients=2
    )
    assert report["rejected"] == {"site1": message}


def test_the_index_is_read_no_further_than_its_limit(family_copy):
    index = family_copy.clients["site1"] / INDEX
    text = index.read_bytes()
    index.write_bytes(text + b" " * (MAX_INDEX_BYTES + 1 - len(text)))
    message = pull_error(family_copy.base, family_copy.clients["site1"], "site1", adapter=False)
    assert message == f"client 'site1': {INDEX} is larger than {MAX_INDEX_BYTES} bytes"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"num_samples": 5, "x": "\\ud800"}', "metrics.json has a lone surrogate escape"),
        (b'{"num_samples": ' + b"[" * 50_000, "metrics.json is not valid JSON (its brackets"),
        (b'{"num_samples": 5, "num_samples": 10}', "metrics.json key 'num_samples' appears twice"),
        (
            b'{"num_samples": 5, "train_loss": 1e308}',
            "train_loss 1e+308 is not a number from -1e+06",
        ),
    ],
)
def test_hostile_metrics_are_refused_alike(family_copy, text, problem):
    (family_copy.clients["site3"] / "metrics.json").write_bytes(text)
    with pytest.raises(MetricsError) as raised:
        check_client_folder(
            family_copy.base, family_copy.clients["site3"], name="site3", adapter=False
        )
    assert str(raised.value).startswith("client 'site3': ") and problem in str(raised.value)


def test_the_declared_bound_on_samples_is_checked_at_the_pull(family):
    message = pull_error(
        family.base, family.clients["site3"], "site3", adapter=False, max_samples=500
    )
    assert message == (
        "client 'site3': metrics.json num_samples 600 exceeds the facility's declared bound of "
        "500 samples (max_samples)"
    )


def test_values_are_read_when_asked(family_copy):
    from safetensors.torch import load_file

    path = family_copy.clients["site2"] / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    client = family_copy.clients["site2"]
    assert check_client_folder(family_copy.base, client, name="site2", adapter=False)
    message = pull_error(family_copy.base, client, "site2", adapter=False, read_values=True)
    assert message == (
        "client 'site2': tensor 'model.norm.weight' holds nan at index [3] (NaN or Inf in the weights)"
    )


def test_a_broken_input_model_is_not_the_facility_s_fault(family_copy):
    (family_copy.base / INDEX).write_text("{")
    with pytest.raises(InputModelError, match="the round's input model fails its own checks"):
        check_client_folder(
            family_copy.base, family_copy.clients["site1"], name="site1", adapter=False
        )


# -- adapters ----------------------------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"
A, B = adapter_key(MODULE, "A"), adapter_key(MODULE, "B")


def adapter(folder: Path, a, b, samples: int = 10) -> Path:
    folder.mkdir(parents=True)
    tensors = {A: torch.tensor(a), B: torch.tensor(b)}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder, LoraSettings(r=1, alpha=2.0, target_modules=("q_proj",)))
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.fixture
def adapters(tmp_path):
    previous = adapter(tmp_path / "prev", [[0.0, 0.0]], [[0.0], [0.0]])
    good = adapter(tmp_path / "good", [[0.0, 0.0]], [[1.0], [0.0]])  # A kept: lora-frozen-a
    bad = adapter(tmp_path / "bad", [[0.0, 1.0]], [[0.0], [1.0]])
    return tmp_path, previous, good, bad


def test_a_valid_adapter_gives_its_metrics(adapters):
    _, previous, good, _ = adapters
    assert check_client_folder(previous, good, name="good", adapter=True) == {"num_samples": 10}


@pytest.mark.parametrize(
    ("file", "change", "problem"),
    [
        (
            "adapter_model.safetensors",
            lambda path: rewrite_header(path, with_surrogate_metadata),
            "adapter_model.safetensors: header has a lone surrogate escape",
        ),
        (
            "adapter_config.json",
            lambda path: path.write_bytes(b'{"r": ' + b"[" * 50_000),
            "adapter_config.json is not valid JSON (its brackets do not balance)",
        ),
        (
            "adapter_config.json",
            lambda path: path.write_bytes(b'{"r": ' + b"1" * 5000 + b"}"),
            "adapter_config.json is not valid JSON (an integer of 5000 digits",
        ),
        (
            "adapter_config.json",
            lambda path: path.write_text(
                json.dumps({**json.loads(path.read_text()), "r": "\\ud800"}).replace(
                    "\\\\ud800", "\\ud800"
                )
            ),
            "adapter_config.json has a lone surrogate escape",
        ),
    ],
)
def test_a_hostile_adapter_is_refused_at_the_pull_and_left_out_by_the_aggregation(
    adapters, file, change, problem
):
    tmp, previous, good, bad = adapters
    change(bad / file)
    message = pull_error(previous, bad, "bad", adapter=True)
    assert message.startswith("client 'bad': ") and problem in message, message
    for strategy in ("lora-fedavg", "lora-svd", "lora-frozen-a"):
        report = aggregate(previous, [good, bad], tmp / strategy, strategy=strategy, min_clients=1)
        assert [c["name"] for c in report["clients"]] == ["good"]
        assert report["rejected"] == {"bad": message}


def test_an_adapter_holding_nan_is_refused_at_the_pull(adapters):
    _, previous, _, bad = adapters
    save_file(
        {A: torch.tensor([[float("nan"), 0.0]]), B: torch.tensor([[0.0], [1.0]])},
        str(bad / "adapter_model.safetensors"),
    )
    assert pull_error(previous, bad, "bad", adapter=True) == "client 'bad': tensor " + repr(A) + (
        " holds NaN at [0, 0]"
    )


# -- every parse failure a refusal -------------------------------------------------------


@pytest.mark.parametrize(
    "error", [ValueError("bad"), RecursionError("deep"), OverflowError("big"), TypeError("kind"),
              KeyError("k"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")],
)  # fmt: skip
def test_a_parse_failure_becomes_a_refusal_naming_client_and_file(error):
    from xffl_tasks.aggregate.facility_files import refusing

    with pytest.raises(AggregationError) as raised:
        with refusing("client 'x'", "metrics.json"):
            raise error
    assert str(raised.value).startswith(
        f"client 'x': metrics.json: unreadable ({type(error).__name__}: "
    )


def test_our_own_errors_and_failed_reads_pass_as_they_are():
    from xffl_tasks.adapter import AdapterError
    from xffl_tasks.aggregate.facility_files import refusing

    for error in (AggregationError("a"), AdapterError("b"), OSError("disk")):
        with pytest.raises(type(error)) as raised:
            with refusing("client 'x'", "f"):
                raise error
        assert raised.value is error


def test_a_moved_a_is_refused_at_the_pull_under_lora_frozen_a(adapters):
    tmp, previous, good, bad = adapters  # bad moved its A
    assert check_client_folder(previous, bad, name="bad", adapter=True) == {"num_samples": 10}
    message = pull_error(previous, bad, "bad", adapter=True, strategy="lora-frozen-a")
    assert message == (
        "client 'bad': lora_A of model.layers.0.self_attn.q_proj differs from the round's A "
        "(lora-frozen-a trains B only)"
    )
    report = aggregate(previous, [good, bad], tmp / "out", strategy="lora-frozen-a", min_clients=1)
    assert report["rejected"] == {"bad": message}
