"""lora-stacked's finite outputs on a tiny bf16 llama: a facility whose finite adapter (B near
3e38) makes the stacked factors or the merged canonical base non-finite is left out, naming
the tensor, and the others' merge is written, the same bytes as theirs alone; too few left is
an error naming the tensor; a facility's merge refuses a non-finite result (exit status 2).
Starts no process."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.xffl_tasks.aggregate.conftest import make_family
from tests.xffl_tasks.aggregate.test_lora_stacked import FACILITIES, digests, make_adapter
from xffl_tasks.adapter import (
    LoraSettings,
    adapter_key,
    base_weight_shapes,
    target_weights,
    write_adapter_config,
)
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.stacked_merge import NonFiniteMerge, merge_stacked_update
from xffl_tasks.stacked_merge import main as merge_main
from xffl_tasks.stacked_update import StackedUpdate, read_stacked_update, write_stacked_update

Q0 = "model.layers.0.self_attn.q_proj"


def huge_adapter(base: Path, folder: Path, *, b: float, alpha: float = 4.0, samples: int = 200) -> Path:
    """An r = 4 adapter of q_proj, every B element ``b`` (finite), every A element 1: its own
    term ``c B A`` is ``4 c b`` per element."""
    settings = LoraSettings(r=4, alpha=alpha, target_modules=("q_proj",))
    tensors = {}
    for module, (rows, columns) in target_weights(base_weight_shapes(base), settings).items():
        tensors[adapter_key(module, "A")] = torch.ones(4, columns)
        tensors[adapter_key(module, "B")] = torch.full((rows, 4), b)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder, settings)
    (folder / "metrics.json").write_text(json.dumps({"num_samples": samples}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked-finite")
    base = make_family(root / "family", torch.bfloat16).base
    good = [
        make_adapter(base, root / name, *FACILITIES[name], seed=index)
        for index, name in enumerate(("cz", "it"))
    ]
    alone = aggregate(base, good, root / "alone", strategy="lora-stacked")
    return {"root": root, "base": base, "good": good, "alone": root / "alone", "report": alone}


def written(out: Path) -> dict[str, str]:
    """Every output file's sha256 but the report's (which names the folders and the rejected)."""
    files = digests(out)
    files.pop("aggregation.json")
    return files


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def no_leftovers(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if ".partial-" in p.name]


def test_a_client_whose_merge_overflows_is_left_out_naming_the_tensor(tiny, tmp_path):
    # site2's share is 1/3 (coefficient 1/3): c B = 1e38 is finite, 4 such terms are not
    site2 = huge_adapter(tiny["base"], tmp_path / "site2", b=3e38)
    report = aggregate(tiny["base"], [*tiny["good"], site2], tmp_path / "out", strategy="lora-stacked",
                       min_clients=2)  # fmt: skip
    reason = report["rejected"]["site2"]
    assert reason.startswith(
        f"client 'site2': its update makes {Q0}.weight non-finite (overflow: its own term alone does, Inf at "
    ), reason
    assert [c["name"] for c in report["clients"]] == ["cz", "it"]
    # the two others' exact merge: the same bytes as aggregating them alone
    assert written(tmp_path / "out") == written(tiny["alone"])
    assert report["canonical_base"]["files"] == tiny["report"]["canonical_base"]["files"]
    assert strict_json(tmp_path / "out" / "aggregation.json")["rejected"] == {"site2": reason}
    assert no_leftovers(tmp_path)


def test_too_few_clients_left_is_an_error_naming_the_tensor(tiny, tmp_path):
    site2 = huge_adapter(tiny["base"], tmp_path / "site2", b=3e38)
    with pytest.raises(AggregationError, match=(
        f"only 2 of 3 clients passed the checks, min_clients is 3; client 'site2': its update makes "
        f"{Q0}.weight non-finite \\(overflow"
    )):  # fmt: skip
        aggregate(tiny["base"], [*tiny["good"], site2], tmp_path / "out", strategy="lora-stacked", min_clients=3)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_a_client_whose_stacked_factor_overflows_is_left_out(tiny, tmp_path):
    # alpha 32 at r 4: coefficient 8/3, so c B = 8e38 is beyond float32 in the stacked B itself
    site2 = huge_adapter(tiny["base"], tmp_path / "site2", b=3e38, alpha=32.0)
    report = aggregate(tiny["base"], [*tiny["good"], site2], tmp_path / "out", strategy="lora-stacked",
                       min_clients=2)  # fmt: skip
    assert report["rejected"]["site2"] == (
        f"client 'site2': its update makes {Q0}.stacked_B non-finite (overflow: beyond float32, "
        "coefficient 2.66667)"
    )
    assert written(tmp_path / "out") == written(tiny["alone"])


def test_clients_that_overflow_only_together_lose_the_largest_first(tiny, tmp_path):
    # weights 1:1:1:1: x's own term is 3e38, y's 1e38, finite each; together Inf. Without x,
    # y's share grows to 1/3 (1.33e38): still finite, so only x is left out
    x = huge_adapter(tiny["base"], tmp_path / "x", b=3e38)
    y = huge_adapter(tiny["base"], tmp_path / "y", b=1e38)
    report = aggregate(tiny["base"], [*tiny["good"], x, y], tmp_path / "out", strategy="lora-stacked",
                       weights=[1, 1, 1, 1], min_clients=3)  # fmt: skip
    assert list(report["rejected"]) == ["x"]
    assert report["rejected"]["x"].startswith(
        f"client 'x': its update makes {Q0}.weight non-finite (overflow: with the others' updates, Inf at "
    )
    assert "left out as the largest, update norm" in report["rejected"]["x"]
    expected = aggregate(tiny["base"], [*tiny["good"], y], tmp_path / "expected", strategy="lora-stacked",
                         weights=[1, 1, 1])  # fmt: skip
    assert written(tmp_path / "out") == written(tmp_path / "expected")
    # y's update (1.33e38 per element) squares beyond float32: the norms are taken in float64
    stored = strict_json(tmp_path / "out" / "aggregation.json")
    assert all(math.isfinite(layer["update_norm"]) for layer in stored["layers"].values())
    assert stored["layers"][Q0]["update_norm"] > 1e38
    assert math.isfinite(expected["global_update_norm"])


def test_a_facility_merge_refuses_a_non_finite_result(tiny, tmp_path):
    update = read_stacked_update(tiny["alone"] / "stacked_update")
    tensors = dict(update.tensors)
    tensors[f"{Q0}.stacked_B"] = torch.full_like(tensors[f"{Q0}.stacked_B"], 3e38)  # finite
    tensors[f"{Q0}.stacked_A"] = torch.ones_like(tensors[f"{Q0}.stacked_A"])
    bad = StackedUpdate(update.clients, update.modules, update.server_learning_rate, tensors,
                        update.base, update.result)  # fmt: skip
    with pytest.raises(NonFiniteMerge, match=f"the update makes '{Q0}.weight' non-finite \\(Inf at ") as caught:
        merge_stacked_update(tiny["base"], bad, tmp_path / "merged")
    assert caught.value.tensor == f"{Q0}.weight"
    assert not (tmp_path / "merged").exists() and no_leftovers(tmp_path)
    folder = tmp_path / "update"
    folder.mkdir()
    write_stacked_update(folder / "stacked_update", bad)
    code = merge_main(["--base", str(tiny["base"]), "--update", str(folder / "stacked_update"),
                       "--out", str(tmp_path / "cli")])  # fmt: skip
    assert code == 2
    assert not (tmp_path / "cli").exists() and no_leftovers(tmp_path)


def test_the_facility_merge_error_names_the_tensor_on_stderr(tiny, tmp_path, capsys):
    update = Path(shutil.copytree(tiny["alone"] / "stacked_update", tmp_path / "update"))
    loaded = read_stacked_update(update)
    tensors = {k: (torch.full_like(v, 3e38) if k.endswith(".stacked_B") else torch.ones_like(v))
               for k, v in loaded.tensors.items()}  # fmt: skip
    shutil.rmtree(update)
    write_stacked_update(update, StackedUpdate(loaded.clients, loaded.modules, loaded.server_learning_rate,
                                               tensors, loaded.base, loaded.result))  # fmt: skip
    assert merge_main(["--base", str(tiny["base"]), "--update", str(update), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xffl-stacked-merge: error: base ") and "non-finite (Inf at " in err
    assert ".self_attn." in err and not (tmp_path / "out").exists()
