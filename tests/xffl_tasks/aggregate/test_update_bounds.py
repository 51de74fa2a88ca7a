"""Declared bounds against capture (issue 22 item 4): ``max_samples`` and the update-norm bound.

Hand-computed on literal folders: a previous model ``w = [0, 0]`` (float32) and three clients
``a = [1, 0]`` (norm 1), ``b = [0, 2]`` (norm 2), ``c = [16, 0]`` (norm 16). With ``k = 2`` the
lower median norm is 2, the limit 4, so ``c`` is scaled by 4 / 16 = 0.25 (exact in float32):
``c' = [4, 0]``. Starts no process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.adapter import LoraSettings, adapter_key, write_adapter_config
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.__main__ import main
from xffl_tasks.aggregate.model_folder import open_model_folder
from xffl_tasks.aggregate.strategies import STRATEGIES
from xffl_tasks.aggregate.update_bounds import (
    NormBound,
    apply_norm_bound,
    check_max_samples,
    check_norm_bound,
)
from xffl_tasks.aggregate.update_norms import update_norms


def test_the_limit_is_k_times_the_lower_median():
    outcome = apply_norm_bound({"a": 1.0, "b": 2.0, "c": 16.0}, NormBound(2.0))
    assert (outcome.median, outcome.limit) == (2.0, 4.0)
    assert outcome.scales == {"c": 0.25} and outcome.refused == {}
    assert outcome.report() == {
        "multiplier": 2.0,
        "action": "clip",
        "median_norm": 2.0,
        "limit": 4.0,
        "norms": {"a": 1.0, "b": 2.0, "c": 16.0},
        "clipped": {"c": {"norm": 16.0, "scale": 0.25}},
        "refused": {},
    }


@pytest.mark.parametrize(
    ("norms", "bound", "scales", "refused"),
    [
        ({"a": 1.0, "b": 100.0}, NormBound(3.0), {"b": 0.03}, []),  # two: the smaller sets it
        ({"a": 0.0, "b": 0.0, "c": 5.0}, NormBound(2.0), {"c": 0.0}, []),  # a zero median
        ({"a": 1.0, "b": 2.0, "c": 16.0}, NormBound(2.0, "refuse"), {}, ["c"]),
        ({"a": 1.0, "b": 2.0, "c": 4.0}, NormBound(2.0), {}, []),  # at the limit: kept
    ],
)
def test_clients_above_the_limit_are_clipped_or_refused(norms, bound, scales, refused):
    outcome = apply_norm_bound(norms, bound)
    assert outcome.scales == scales and sorted(outcome.refused) == refused


def test_a_refusal_names_the_norm_and_the_limit():
    outcome = apply_norm_bound({"a": 1.0, "b": 2.0, "c": 16.0}, NormBound(2.0, "refuse"))
    assert outcome.refused["c"] == (
        "client 'c': update norm 16 is above 2 x the median client update norm 2 (limit 4; "
        "norm_bound refuse)"
    )


@pytest.mark.parametrize(
    ("multiplier", "action", "words"),
    [
        (0.5, "clip", r"norm_bound 0.5 must be from 1 to 1e\+06"),
        (float("nan"), "clip", "must be from 1"),
        ("2", "clip", "norm_bound '2' is not a number"),
        (True, "clip", "is not a number"),
        (2.0, "cut", "norm_bound_action 'cut' is not one of clip, refuse"),
    ],
)
def test_bad_bounds_are_named(multiplier, action, words):
    with pytest.raises(AggregationError, match=words):
        check_norm_bound(multiplier, action)


@pytest.mark.parametrize(
    ("bounds", "words"),
    [([1, 2], "max_samples: 2 bounds for 3 clients"), ([1, 0, None], "0 is not a whole number"),
     ([True, None, None], "True is not a whole number"), ([1.5, None, None], "1.5 is not")],
)  # fmt: skip
def test_bad_sample_bounds_are_named(bounds, words):
    with pytest.raises(AggregationError, match=words):
        check_max_samples(bounds, 3)


# -- full models -------------------------------------------------------------------------


def model(folder: Path, values, samples: int = 10) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.tensor(values)}, str(folder / "model.safetensors"))
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.fixture
def literal(tmp_path):
    previous = model(tmp_path / "previous", [0.0, 0.0])
    clients = [
        model(tmp_path / n, v)
        for n, v in (("a", [1.0, 0.0]), ("b", [0.0, 2.0]), ("c", [16.0, 0.0]))
    ]
    return tmp_path, previous, clients


def test_the_norms_pass_measures_client_minus_previous(literal):
    _, previous, clients = literal
    folder = open_model_folder(previous, label="previous")
    norms = update_norms(folder, [open_model_folder(c, label=c.name) for c in clients])
    assert [n.norm for n in norms] == [1.0, 2.0, 16.0] and all(n.problem is None for n in norms)


def test_clipping_averages_the_scaled_update(literal):
    tmp, previous, clients = literal
    report = aggregate(previous, clients, tmp / "out", norm_bound=2.0)
    # (a + b + c') / 3 with c' = [4, 0]
    assert load_file(tmp / "out" / "model.safetensors")["w"].tolist() == pytest.approx(
        [5 / 3, 2 / 3], rel=1e-7
    )
    assert report["norm_bound"]["clipped"] == {"c": {"norm": 16.0, "scale": 0.25}}
    assert [c["update_norm"] for c in report["clients"]] == [1.0, 2.0, 4.0]
    assert report["rejected"] == {}


def test_refusing_leaves_the_client_out(literal):
    tmp, previous, clients = literal
    report = aggregate(previous, clients, tmp / "out", norm_bound=2.0, norm_bound_action="refuse",
                       min_clients=2)  # fmt: skip
    assert load_file(tmp / "out" / "model.safetensors")["w"].tolist() == [0.5, 1.0]
    assert list(report["rejected"]) == ["c"] and report["norm_bound"]["refused"] == {"c": 16.0}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_aggregates_the_clipped_update(literal, strategy):
    tmp, previous, clients = literal
    clipped = model(tmp / "c_clipped", [4.0, 0.0])
    aggregate(previous, clients, tmp / "out", strategy=strategy, norm_bound=2.0,
              names=["a", "b", "c"])  # fmt: skip
    aggregate(previous, [*clients[:2], clipped], tmp / "expected", strategy=strategy,
              names=["a", "b", "c"])  # fmt: skip
    for path in sorted((tmp / "expected").rglob("*.safetensors")):
        relative = path.relative_to(tmp / "expected")
        assert (tmp / "out" / relative).read_bytes() == path.read_bytes(), relative


def test_a_claim_above_the_declared_bound_is_left_out(family_copy, tmp_path):
    clients = list(family_copy.clients.values())[::-1]  # site3 (600 samples), site2, site1
    report = aggregate(family_copy.base, clients, tmp_path / "out", min_clients=2,
                       max_samples=[500, None, 1000])  # fmt: skip
    assert report["rejected"] == {
        "site3": "client 'site3': metrics.json num_samples 600 exceeds the facility's declared "
        "bound of 500 samples (max_samples)"
    }
    assert report["max_samples"] == {"site1": 1000, "site2": None, "site3": 500}
    assert [c["normalized_weight"] for c in report["clients"]] == [0.25, 0.75]


def test_a_bound_on_samples_reads_the_claim_even_with_given_weights(literal):
    tmp, previous, clients = literal
    report = aggregate(previous, clients, tmp / "out", weights=[1, 1, 1], max_samples=[None, 5, None],
                       min_clients=2)  # fmt: skip
    assert list(report["rejected"]) == ["b"]


def test_the_cli_passes_both_bounds(literal, capsys):
    tmp, previous, clients = literal
    argv = ["--previous", str(previous), "--out", str(tmp / "out"), "--max-samples", ",,20",
            "--norm-bound", "2", *map(str, clients)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "client 'c' clipped: update norm 16 scaled by 0.25 (--norm-bound)" in err
    report = json.loads((tmp / "out" / "aggregation.json").read_text())
    assert report["max_samples"] == {"a": None, "b": None, "c": 20}
    assert main([*argv[:3], str(tmp / "bad"), "--max-samples", "x", *map(str, clients)]) == 2
    assert "--max-samples: value 1 ('x') is not a whole number" in capsys.readouterr().err


# -- adapters ----------------------------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"
A, B = adapter_key(MODULE, "A"), adapter_key(MODULE, "B")


def adapter(folder: Path, a, b, samples: int = 10) -> Path:
    folder.mkdir(parents=True)
    save_file({A: torch.tensor(a), B: torch.tensor(b)}, str(folder / "adapter_model.safetensors"))
    write_adapter_config(folder, LoraSettings(r=1, alpha=2.0, target_modules=("q_proj",)))
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.mark.parametrize(
    ("strategy", "clients"),
    [  # (A, B) of a (norm 1), b (norm 2), c (norm 16, clipped to 4) and c clipped by hand
        ("lora-fedavg", [([[1.0, 0.0]], [[0.0], [0.0]]), ([[0.0, 2.0]], [[0.0], [0.0]]),
                         ([[0.0, 0.0]], [[16.0], [0.0]]), ([[0.0, 0.0]], [[4.0], [0.0]])]),
        ("lora-svd", [([[1.0, 0.0]], [[1.0], [0.0]]), ([[0.0, 2.0]], [[0.0], [0.0]]),
                      ([[0.0, 0.0]], [[16.0], [0.0]]), ([[0.0, 0.0]], [[4.0], [0.0]])]),
        ("lora-frozen-a", [([[0.0, 0.0]], [[1.0], [0.0]]), ([[0.0, 0.0]], [[0.0], [2.0]]),
                           ([[0.0, 0.0]], [[16.0], [0.0]]), ([[0.0, 0.0]], [[4.0], [0.0]])]),
    ],
)  # fmt: skip
def test_adapters_are_clipped_in_the_space_of_their_tensors(tmp_path, strategy, clients):
    previous = adapter(tmp_path / "prev", [[0.0, 0.0]], [[0.0], [0.0]])
    folders = [adapter(tmp_path / n, *c) for n, c in zip(("a", "b", "c", "c_clipped"), clients)]
    report = aggregate(previous, folders[:3], tmp_path / "out", strategy=strategy, norm_bound=2.0)
    assert report["norm_bound"]["norms"]["c"] == 16.0
    assert report["norm_bound"]["clipped"] == {"c": {"norm": 16.0, "scale": 0.25}}
    aggregate(previous, [*folders[:2], folders[3]], tmp_path / "expected", strategy=strategy,
              names=["a", "b", "c"])  # fmt: skip
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "expected" / "adapter_model.safetensors"
    ).read_bytes()


def test_an_adapter_above_the_limit_can_be_refused(tmp_path):
    previous = adapter(tmp_path / "prev", [[0.0, 0.0]], [[0.0], [0.0]])
    a = adapter(tmp_path / "a", [[1.0, 0.0]], [[0.0], [0.0]])
    b = adapter(tmp_path / "b", [[0.0, 2.0]], [[0.0], [0.0]])
    c = adapter(tmp_path / "c", [[0.0, 0.0]], [[16.0], [0.0]], samples=10**9)
    report = aggregate(previous, [a, b, c], tmp_path / "out", strategy="lora-fedavg", norm_bound=2,
                       norm_bound_action="refuse", max_samples=[100, 100, None], min_clients=2)  # fmt: skip
    assert (
        list(report["rejected"]) == ["c"]
        and "update norm 16 is above 2 x" in report["rejected"]["c"]
    )
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")[A].tolist() == [[0.5, 1.0]]


def test_lora_stacked_refuses_the_norm_bound_it_cannot_apply_yet(tmp_path):
    with pytest.raises(AggregationError, match="norm_bound is not offered by lora-stacked yet"):
        aggregate(tmp_path, [tmp_path / "a"], tmp_path / "out", strategy="lora-stacked", norm_bound=2)
    with pytest.raises(AggregationError) as raised:  # max_samples is offered: the folders' own errors
        aggregate(tmp_path / "base", [tmp_path / "a"], tmp_path / "out", strategy="lora-stacked", max_samples=[5])
    assert "not offered" not in str(raised.value)
