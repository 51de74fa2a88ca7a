"""lora-stacked end to end on a tiny llama (bf16 and float32, sharded): the aggregation's
stacked update and canonical base, the facility's merge of the same update (bit for bit the
canonical base), the hash checks that name a diverged tensor, the refusals. Facilities train
r = 4 and r = 16 adapters. Starts no process."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.xffl_tasks.aggregate.conftest import load_tensors, make_family
from xffl_tasks.adapter import (
    LoraSettings,
    adapter_key,
    base_weight_shapes,
    target_weights,
    write_adapter_config,
)
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.__main__ import main as aggregate_main
from xffl_tasks.aggregate.lora_stacked import check_stacked_client
from xffl_tasks.base_hashes import BaseMismatch, check_base_hashes, load_base_hashes
from xffl_tasks.stacked_merge import main as merge_main
from xffl_tasks.stacked_merge import merge_stacked_update
from xffl_tasks.stacked_update import StackedUpdateError, read_stacked_update

#: name -> (r, alpha, num_samples, target modules)
FACILITIES = {
    "it": (4, 8.0, 100, ("q_proj", "v_proj")),
    "cz": (16, 32.0, 300, ("q_proj", "v_proj")),
    "de": (4, 4.0, 200, ("q_proj", "k_proj", "v_proj", "o_proj")),
}


def make_adapter(base: Path, folder: Path, r: int, alpha: float, samples: int, modules, seed: int):
    """A trained-looking adapter: A and B random (B would start at zero and move)."""
    settings = LoraSettings(r=r, alpha=alpha, target_modules=modules)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, columns) in target_weights(base_weight_shapes(base), settings).items():
        tensors[adapter_key(module, "A")] = torch.randn(r, columns, generator=generator) / 8
        tensors[adapter_key(module, "B")] = torch.randn(rows, r, generator=generator) / 8
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder, settings)
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def stacked(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    base = make_family(root / "family", request.param).base
    clients = [
        make_adapter(base, root / name, *spec, seed=index)
        for index, (name, spec) in enumerate(FACILITIES.items())
    ]
    report = aggregate(base, clients, root / "out", strategy="lora-stacked")
    return {"root": root, "base": base, "clients": clients, "out": root / "out", "report": report}


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_canonical_base_is_w0_plus_the_weighted_scaled_products(stacked):
    base, out = stacked["base"], stacked["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "aggregation.json", "base", "base_hashes.json", "stacked_update",
    ]  # fmt: skip
    before, after = load_tensors(base), load_tensors(out / "base")
    total = sum(spec[2] for spec in FACILITIES.values())
    expected = {name: w.double() for name, w in before.items()}
    for name, (r, alpha, samples, _) in FACILITIES.items():
        adapter = load_file(str(stacked["root"] / name / "adapter_model.safetensors"))
        for key, a in adapter.items():
            if ".lora_A." in key:
                weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                b = adapter[key.replace("lora_A", "lora_B")]
                expected[weight] += (samples / total) * (alpha / r) * (b.double() @ a.double())
    adapted = {n for n in expected if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))}
    assert len(adapted) == 8
    for name, weight in after.items():
        assert weight.dtype == before[name].dtype
        if name not in adapted:
            assert torch.equal(weight, before[name]), name  # byte for byte
            continue
        gap = (weight.double() - expected[name]).abs()
        if weight.dtype == torch.bfloat16:  # half a bf16 spacing of the exact value
            assert bool((gap <= expected[name].abs() * 2.0**-8 * (1 + 1e-3) + 1e-7).all()), name
        else:
            assert float(gap.max()) < 1e-6, name
        assert not torch.equal(weight, before[name]), name


def test_the_report_records_the_stack_and_the_canonical_base(stacked):
    report, out = stacked["report"], stacked["out"]
    assert report["strategy"] == "lora-stacked" and report["exact"] is True
    assert report["adapter"]["ranks"] == {"cz": 16, "de": 4, "it": 4}
    assert report["adapter"]["stacked_rank"] == 24  # q and v: 4 + 16 + 4
    assert [c["name"] for c in report["clients"]] == ["cz", "de", "it"]  # the stack order
    cz = report["clients"][0]
    assert cz["coefficient"] == pytest.approx(300 / 600 * 32.0 / 16)
    hashes = load_base_hashes(out / "base_hashes.json")
    assert report["canonical_base"]["files"] == hashes.files == {
        name: digest for name, digest in digests(out / "base").items()
    }
    assert report["canonical_base"]["previous_files"] == digests(stacked["base"])
    assert report["stacked_update"]["files"] == {
        name: digest for name, digest in digests(out / "stacked_update").items()
    }
    written = digests(out)
    written.pop("aggregation.json")  # the report cannot hold its own hash
    assert report["output_files"] == written
    update = read_stacked_update(out / "stacked_update")
    assert update.result == hashes and update.base.files == digests(stacked["base"])
    module = update.modules["model.layers.0.self_attn.k_proj"]
    assert module.clients == ("de",) and module.rank == 4
    # the update travels as factors: n adapters' bytes (plus the header and the JSON)
    factors = sum(t.numel() * 4 for t in update.tensors.values())
    adapters = sum((stacked["root"] / n / "adapter_model.safetensors").stat().st_size for n in FACILITIES)
    assert factors == sum(
        t.numel() * 4 for n in FACILITIES for t in load_file(str(stacked["root"] / n / "adapter_model.safetensors")).values()
    )
    assert factors < report["stacked_update"]["bytes"] < adapters + (64 << 10)
    assert report["global_update_norm"] > 0 and report["merge"]["threads"] == 1


def test_a_facility_merge_is_the_canonical_base_bit_for_bit(stacked, tmp_path):
    torch.set_num_threads(2)  # the merge runs on one thread whatever the caller's setting
    outcome = merge_stacked_update(stacked["base"], stacked["out"] / "stacked_update", tmp_path / "merged")
    assert digests(tmp_path / "merged") == digests(stacked["out"] / "base")
    assert outcome.output.files == stacked["report"]["canonical_base"]["files"]
    assert torch.get_num_threads() == 2
    # a retried job finds it merged: checked, kept
    again = merge_stacked_update(stacked["base"], stacked["out"] / "stacked_update", tmp_path / "merged")
    assert again.reused
    assert merge_main(["--base", str(stacked["base"]), "--update", str(stacked["out"] / "stacked_update"),
                       "--out", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert digests(tmp_path / "cli") == digests(stacked["out"] / "base")


def test_the_same_inputs_give_the_same_bytes_in_any_client_order(stacked, tmp_path):
    report = aggregate(stacked["base"], stacked["clients"][::-1], tmp_path / "again", strategy="lora-stacked")
    first, second = digests(stacked["out"]), digests(tmp_path / "again")
    first.pop("aggregation.json"), second.pop("aggregation.json")
    assert first == second
    assert report["canonical_base"]["files"] == stacked["report"]["canonical_base"]["files"]


def test_a_second_round_continues_from_the_previous_output(stacked, tmp_path):
    clients = [shutil.copytree(c, tmp_path / c.name) for c in stacked["clients"][:2]]
    report = aggregate(stacked["out"], clients, tmp_path / "round1", strategy="lora-stacked")
    assert report["canonical_base"]["previous"] == str(stacked["out"] / "base")
    merged0 = tmp_path / "facility0"
    merge_stacked_update(stacked["base"], stacked["out"] / "stacked_update", merged0)
    merge_stacked_update(merged0, tmp_path / "round1" / "stacked_update", tmp_path / "facility1")
    assert digests(tmp_path / "facility1") == digests(tmp_path / "round1" / "base")
    # a facility that missed round 0 holds the wrong base: refused, the tensor named
    with pytest.raises(BaseMismatch, match="is not the base the update applies to: tensor 'model.layers.0.self_attn.k_proj.weight'"):
        merge_stacked_update(stacked["base"], tmp_path / "round1" / "stacked_update", tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _flip_one_byte(folder: Path, tensor: str) -> str:
    """Changes one byte of ``tensor``'s data in its shard; returns the shard's name."""
    from xffl_tasks.aggregate.model_folder import open_model_folder

    location = open_model_folder(folder, label="x").tensors[tensor]
    with open(location.shard.path, "r+b") as file:
        file.seek(location.offset + 1)
        value = file.read(1)
        file.seek(location.offset + 1)
        file.write(bytes([value[0] ^ 0x01]))
    return location.shard.file


def test_a_diverged_base_is_refused_naming_the_tensor(stacked, tmp_path):
    base = Path(shutil.copytree(stacked["base"], tmp_path / "base"))
    name = "model.layers.1.mlp.up_proj.weight"  # not adapted: copied, so it diverges the result
    shard = _flip_one_byte(base, name)
    with pytest.raises(BaseMismatch) as caught:
        merge_stacked_update(base, stacked["out"] / "stacked_update", tmp_path / "merged")
    assert caught.value.tensor == name and caught.value.file == shard
    assert f"tensor {name!r} ({shard}) holds other bytes" in str(caught.value)
    assert not (tmp_path / "merged").exists()
    assert merge_main(["--base", str(base), "--update", str(stacked["out"] / "stacked_update"),
                       "--out", str(tmp_path / "cli")]) == 2  # fmt: skip
    # the check alone: with the per-tensor record, and with only the files' hashes
    canonical = Path(shutil.copytree(stacked["out"] / "base", tmp_path / "canonical"))
    record = load_base_hashes(stacked["out"] / "base_hashes.json")
    assert check_base_hashes(canonical, record).files == record.files
    adapted = "model.layers.0.self_attn.v_proj.weight"
    shard = _flip_one_byte(canonical, adapted)
    with pytest.raises(BaseMismatch, match=f"tensor '{adapted}' \\({shard}\\) holds other bytes"):
        check_base_hashes(canonical, stacked["out"] / "base_hashes.json")
    with pytest.raises(BaseMismatch, match=f"{shard} differs .*no per-tensor hashes"):
        check_base_hashes(canonical, record.files)  # a plain {file: sha256} map
    assert merge_main(["--base", str(canonical), "--expect", str(stacked["out"] / "base_hashes.json")]) == 2


def test_a_base_of_another_dtype_is_refused_from_its_headers(stacked, tmp_path):
    update = read_stacked_update(stacked["out"] / "stacked_update")
    ours = next(iter(update.base.tensors.values())).dtype
    other = make_family(tmp_path / "other", torch.float32 if ours == "BF16" else torch.bfloat16).base
    with pytest.raises(BaseMismatch, match="is not the base the update applies to: tensor .* is (F32|BF16) "):
        merge_stacked_update(other, update, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_damaged_update_is_refused(stacked, tmp_path):
    update = Path(shutil.copytree(stacked["out"] / "stacked_update", tmp_path / "update"))
    weights = update / "stacked_update.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(StackedUpdateError, match="does not have the sha256"):
        merge_stacked_update(stacked["base"], update, tmp_path / "merged")
    description = json.loads((update / "stacked_update.json").read_text())
    description["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 5
    (update / "stacked_update.json").write_text(json.dumps(description))
    with pytest.raises(StackedUpdateError, match="rank must be 24"):
        read_stacked_update(update)


def test_server_learning_rate_scales_the_stacked_b_and_momentum_is_refused(stacked, tmp_path):
    report = aggregate(stacked["base"], stacked["clients"], tmp_path / "half", strategy="lora-stacked",
                       options={"server_learning_rate": 0.5})  # fmt: skip
    assert report["global_update_norm"] == pytest.approx(stacked["report"]["global_update_norm"] / 2)
    full = read_stacked_update(stacked["out"] / "stacked_update")
    half = read_stacked_update(tmp_path / "half" / "stacked_update")
    key = "model.layers.1.self_attn.q_proj.stacked_B"
    assert torch.allclose(half.tensors[key] * 2, full.tensors[key], rtol=1e-6)
    with pytest.raises(AggregationError, match="lora-stacked cannot keep server momentum.*dense"):
        aggregate(stacked["base"], stacked["clients"], tmp_path / "m", strategy="lora-stacked",
                  options={"momentum": 0.9})  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_bad_clients_are_left_out_with_their_reason(stacked, tmp_path):
    base = stacked["base"]
    nan = make_adapter(base, tmp_path / "fr", 4, 8.0, 10, ("q_proj",), seed=9)
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    wrong = make_adapter(base, tmp_path / "es", 4, 8.0, 10, ("q_proj",), seed=10)
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    tensors = {k: (torch.zeros(4, 3) if ".lora_A." in k else v) for k, v in tensors.items()}
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    report = aggregate(base, [*stacked["clients"], nan, wrong], tmp_path / "out",
                       strategy="lora-stacked", min_clients=3)  # fmt: skip
    assert "holds NaN at [0, 0]" in report["rejected"]["fr"]
    assert "does not fit the base's" in report["rejected"]["es"]
    with pytest.raises(AggregationError, match="does not fit the base's"):
        check_stacked_client(base, wrong, label="client 'es'")
    assert check_stacked_client(base, stacked["clients"][1], label="client 'cz'").r == 16
    assert check_stacked_client(stacked["out"], stacked["clients"][1], label="client 'cz'").r == 16
    with pytest.raises(AggregationError, match="the facility is set to r=8"):
        check_stacked_client(base, stacked["clients"][1], label="client 'cz'",
                             settings=LoraSettings(r=8, target_modules=("q_proj", "v_proj")))  # fmt: skip


def test_through_the_cli(stacked, tmp_path):
    out = tmp_path / "cli"
    code = aggregate_main(["--previous", str(stacked["base"]), "--out", str(out), "--strategy", "lora-stacked",
                           *map(str, stacked["clients"])])  # fmt: skip
    assert code == 0
    assert digests(out / "base") == digests(stacked["out"] / "base")
