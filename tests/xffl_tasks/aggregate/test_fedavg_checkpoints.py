"""FedAvg on real sharded Hugging Face checkpoints with tied embeddings, against float64.

Uses the session's tiny llama family (conftest): a bf16 base in six shards and three
perturbed clients, each sharded its own way. Starts no process.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from tests.xffl_tasks.aggregate.conftest import CLIENT_SAMPLES, load_tensors
from xffl_tasks.aggregate import aggregate
from xffl_tasks.aggregate.safetensors_format import read_header

MANTISSA_BITS = {torch.float8_e4m3fn: 4, torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers around each value of ``reference`` (float64)."""
    _, exponent = torch.frexp(reference)
    return torch.ldexp(torch.ones_like(reference), exponent - MANTISSA_BITS[dtype])


def weighted_reference(family) -> dict[str, torch.Tensor]:
    clients = [load_tensors(path) for path in family.clients.values()]
    weights = [float(CLIENT_SAMPLES[name]) for name in family.clients]
    total = math.fsum(weights)
    return {
        name: sum(w * c[name].double() for w, c in zip(weights, clients)) / total
        for name in clients[0]
    }


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fedavg_equals_the_float64_weighted_mean_within_output_rounding(family, tmp_path):
    out = tmp_path / "global"
    aggregate(family.base, list(family.clients.values()), out)
    ours = load_tensors(out)
    reference = weighted_reference(family)
    assert set(ours) == set(reference) and "lm_head.weight" not in ours  # tied: not saved
    exact = total = 0
    for name, expected in reference.items():
        got = ours[name]
        assert got.dtype == torch.bfloat16, name
        error = (got.double() - expected).abs()
        # Rounded once to bf16 (half an ulp), plus the float32 accumulation's own rounding.
        bound = 0.5 * ulp(expected, torch.bfloat16) + expected.abs() * 2.0**-20
        assert bool((error <= bound).all()), (name, float((error - bound).max()))
        exact += int((got == expected.to(torch.bfloat16)).sum())
        total += expected.numel()
    assert exact / total > 0.99  # double rounding (f64 -> f32 -> bf16) differs only at ties


def test_fedavg_in_float32_is_within_float32_rounding(family_f32, tmp_path):
    out = tmp_path / "global"
    aggregate(family_f32.base, list(family_f32.clients.values()), out)
    ours = load_tensors(out)
    inputs = [load_tensors(family_f32.base)] + [
        load_tensors(p) for p in family_f32.clients.values()
    ]
    for name, expected in weighted_reference(family_f32).items():
        # float32 arithmetic on values of the inputs' magnitude: a few of their ulps.
        scale = torch.stack([tensors[name].double().abs() for tensors in inputs]).amax(0)
        error = (ours[name].double() - expected).abs()
        assert ours[name].dtype == torch.float32
        assert bool((error <= 8 * ulp(scale, torch.float32)).all()), name


def test_output_keeps_the_previous_layout_and_loads_with_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "global"
    aggregate(family.base, list(family.clients.values()), out)
    base_files = sorted(p.name for p in family.base.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted([*base_files, "aggregation.json"])
    for path in family.base.glob("*.safetensors"):
        assert read_header(out / path.name).header_bytes == read_header(path).header_bytes
        assert (out / path.name).stat().st_size == path.stat().st_size
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ):
        assert (out / name).read_bytes() == (family.base / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(
        model.model.embed_tokens.weight, load_tensors(out)["model.embed_tokens.weight"]
    )
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [2, 3]


def test_report_records_weights_hashes_norms_and_cosines(family, tmp_path):
    out = tmp_path / "global"
    report = aggregate(family.base, list(family.clients.values()), out, names=["a", "b", "c"])
    assert json.loads((out / "aggregation.json").read_text()) == report
    assert report["strategy"] == "fedavg"
    previous = load_tensors(family.base)
    reference = weighted_reference(family)
    change = {n: reference[n] - previous[n].double() for n in previous}
    global_norm = math.sqrt(sum(float((c * c).sum()) for c in change.values()))
    assert report["global_update_norm"] == pytest.approx(global_norm, rel=1e-4)
    total = sum(CLIENT_SAMPLES.values())
    for entry, (site, path) in zip(report["clients"], family.clients.items()):
        assert entry["name"] in ("a", "b", "c") and entry["path"] == str(path)
        assert entry["weight"] == CLIENT_SAMPLES[site] and entry["weight_source"] == "num_samples"
        assert entry["normalized_weight"] == pytest.approx(CLIENT_SAMPLES[site] / total)
        client = load_tensors(path)
        update = {n: client[n].double() - previous[n].double() for n in previous}
        norm = math.sqrt(sum(float((u * u).sum()) for u in update.values()))
        dot = sum(float((update[n] * change[n]).sum()) for n in previous)
        assert entry["update_norm"] == pytest.approx(norm, rel=1e-5)
        assert entry["cosine_to_aggregate"] == pytest.approx(dot / (norm * global_norm), abs=1e-4)
        files = {p.name for p in path.iterdir()}
        assert set(entry["files"]) == files and "metrics.json" in files
        assert all(entry["files"][name] == sha256(path / name) for name in files)
    assert report["previous_files"] == {p.name: sha256(p) for p in family.base.iterdir()}
    written = {p.name: sha256(p) for p in out.iterdir() if p.name != "aggregation.json"}
    assert report["output_files"] == written
    assert report["bytes_written"] == sum((out / n).stat().st_size for n in written)
    assert report["bytes_read"] >= sum(
        p.stat().st_size for f in [family.base, *family.clients.values()] for p in f.iterdir()
    )
    assert report["seconds"] > 0


@pytest.mark.parametrize("chunk_elements", [7, 1000])
def test_chunk_boundaries_do_not_change_the_result(family, tmp_path, chunk_elements):
    clients = list(family.clients.values())
    whole = aggregate(family.base, clients, tmp_path / "whole")
    chunked = aggregate(family.base, clients, tmp_path / "chunked", chunk_elements=chunk_elements)
    assert chunked["output_files"] == whole["output_files"]
    for a, b in zip(whole["clients"], chunked["clients"]):
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-6)
        assert a["cosine_to_aggregate"] == pytest.approx(b["cosine_to_aggregate"], abs=1e-6)


def test_a_client_that_is_the_previous_model_itself(family, tmp_path):
    site1 = family.clients["site1"]
    report = aggregate(family.base, [family.base, site1], tmp_path / "global", weights=[1, 1])
    assert report["clients"][0]["update_norm"] == 0.0
    assert report["clients"][0]["cosine_to_aggregate"] is None
    assert report["clients"][0]["files"] == {p.name: sha256(p) for p in family.base.iterdir()}
    assert report["previous_files"] == report["clients"][0]["files"]
