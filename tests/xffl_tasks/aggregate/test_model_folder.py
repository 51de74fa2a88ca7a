"""Finding a model folder's weights: single file or index and shards, each checked. Starts nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.model_folder import check_same_tensors, open_model_folder

LABEL = "client 'site1'"


def sharded(folder, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict | None = None):
    folder.mkdir(exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, str(folder / file))
    if weight_map is None:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def two_shards(folder, **kwargs):
    shards = {
        "a.safetensors": {"x": torch.zeros(2)},
        "b.safetensors": {"y": torch.ones(3), "z": torch.ones(1)},
    }
    return sharded(folder, shards, **kwargs)


def refused(folder, *words):
    with pytest.raises(AggregationError) as error:
        open_model_folder(folder, label=LABEL)
    message = str(error.value)
    assert message.startswith(LABEL)
    for word in words:
        assert word in message, message


def test_sharded_folder_maps_every_tensor_to_its_shard(tmp_path):
    model = open_model_folder(two_shards(tmp_path / "m"), label=LABEL)
    assert [s.file for s in model.shards] == ["a.safetensors", "b.safetensors"]
    assert {n: loc.shard.file for n, loc in model.tensors.items()} == {
        "x": "a.safetensors",
        "y": "b.safetensors",
        "z": "b.safetensors",
    }
    assert model.index_file == "model.safetensors.index.json"
    y = model.tensors["y"]
    assert y.offset == y.shard.header.data_start + y.entry.begin


def test_single_file_folder(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors"))
    model = open_model_folder(tmp_path / "m", label=LABEL)
    assert model.index_file is None and list(model.tensors) == ["x"]


def test_index_may_not_leave_the_folder(tmp_path):
    refused(
        two_shards(tmp_path / "m", weight_map={"x": "../a.safetensors"}),
        "'x'",
        "'../a.safetensors'",
    )


def test_index_naming_a_missing_shard(tmp_path):
    refused(
        two_shards(
            tmp_path / "m",
            weight_map={"x": "a.safetensors", "y": "c.safetensors", "z": "b.safetensors"},
        ),
        "'c.safetensors'",
        "missing",
    )


def test_a_shard_the_index_does_not_list(tmp_path):
    folder = two_shards(tmp_path / "m")
    save_file({"q": torch.zeros(1)}, str(folder / "model-extra.safetensors"))
    refused(folder, "'model-extra.safetensors'", "not in model.safetensors.index.json")


def test_index_placing_a_tensor_in_the_wrong_shard(tmp_path):
    wrong = {"x": "b.safetensors", "y": "b.safetensors", "z": "a.safetensors"}
    refused(two_shards(tmp_path / "m", weight_map=wrong), "tensor 'x'", "a.safetensors")


def test_index_listing_a_tensor_no_shard_holds(tmp_path):
    listed = {
        "x": "a.safetensors",
        "y": "b.safetensors",
        "z": "b.safetensors",
        "w": "b.safetensors",
    }
    refused(two_shards(tmp_path / "m", weight_map=listed), "tensor 'w'")


def test_a_tensor_in_two_shards(tmp_path):
    shards = {
        "a.safetensors": {"x": torch.zeros(2)},
        "b.safetensors": {"x": torch.zeros(2), "y": torch.zeros(1)},
    }
    weight_map = {"x": "a.safetensors", "y": "b.safetensors"}
    refused(sharded(tmp_path / "m", shards, weight_map=weight_map), "tensor 'x'", "both")


def test_no_weights_pickles_and_non_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no model.safetensors")
    refused(tmp_path / "nothing-here", "not a directory")
    folder = two_shards(tmp_path / "m")
    (folder / "training_args.bin").write_bytes(b"\x80\x04N.")
    refused(folder, "pickle", "'training_args.bin'")


def test_same_tensors_compares_by_name_across_shardings(tmp_path):
    previous = open_model_folder(two_shards(tmp_path / "p"), label="previous global model")
    (tmp_path / "c").mkdir()
    save_file(
        {"z": torch.ones(1), "y": torch.ones(3), "x": torch.ones(2)},
        str(tmp_path / "c" / "model.safetensors"),
    )
    check_same_tensors(previous, open_model_folder(tmp_path / "c", label=LABEL))
