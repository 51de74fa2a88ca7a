"""Model folders checked before loading (no pickles, no corrupt weights) and the output folder
that appears only complete. Small safetensors files written in the test; starts nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from xffl_tasks.train.checkpoint import (
    METRICS,
    ModelError,
    OutputFolder,
    inspect_model_folder,
    read_safetensors_header,
    state_dict_for_output,
)
from xffl_tasks.train.config import ConfigError

CONFIG = {"model_type": "llama", "max_position_embeddings": 128, "dtype": "bfloat16"}


def model_folder(path, tensors=None, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = (
        tensors
        if tensors is not None
        else {"a.weight": torch.zeros(2, 2, dtype=torch.bfloat16), "b": torch.ones(3)}
    )
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_inspect_reads_names_dtypes_and_context(tmp_path):
    folder = inspect_model_folder(model_folder(tmp_path / "m"))
    assert folder.tensors == {"a.weight": "BF16", "b": "F32"}
    assert folder.context_length == 128
    assert folder.weight_files == (tmp_path / "m" / "model.safetensors",)


def test_sharded_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file({"a": torch.zeros(1)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(
        {"b": torch.zeros(1, dtype=torch.float16)}, str(folder / "model-00002-of-00002.safetensors")
    )
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert inspect_model_folder(folder).tensors == {"a": "F32", "b": "F16"}
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelError, match="lists model-00002-of-00002.safetensors, which is missing"
    ):
        inspect_model_folder(folder)


def test_pickle_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(
        ModelError, match=r"pytorch_model.bin: pickle checkpoint refused: only safetensors"
    ):
        inspect_model_folder(folder)


def test_safetensors_next_to_a_pickle_is_used(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"ignored")
    assert "a.weight" in inspect_model_folder(folder).tensors


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{"), "config.json: corrupt: not valid JSON"),
        (lambda f: (f / "config.json").write_text("{}"), "config.json: corrupt: no model_type"),
        (lambda f: (f / "model.safetensors").unlink(), "no safetensors weights"),
        (
            lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 4),
            "not a safetensors file \\(too short\\)",
        ),
        (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64), "bad header length"),
        (
            lambda f: (f / "model.safetensors").write_bytes(
                (8).to_bytes(8, "little") + b"notjson!"
            ),
            "unreadable header",
        ),
    ],
)
def test_corrupt_folders_name_the_file(tmp_path, damage, message):
    folder = model_folder(tmp_path / "m")
    damage(folder)
    with pytest.raises(ModelError, match=message):
        inspect_model_folder(folder)


def test_truncated_weights(tmp_path):
    folder = model_folder(tmp_path / "m", {"w": torch.zeros(64)})
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"model.safetensors: truncated"):
        read_safetensors_header(path)


def test_missing_and_non_folder(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        inspect_model_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        inspect_model_folder(tmp_path / "file")


def test_output_state_keeps_input_names_and_dtypes(tmp_path):
    source = inspect_model_folder(model_folder(tmp_path / "m"))
    shared = torch.ones(2, 2)
    state = {"a.weight": shared, "lm_head.weight": shared, "b": torch.ones(3, dtype=torch.float64)}
    out = state_dict_for_output(state, source, aliases=[["a.weight", "lm_head.weight"]])
    assert sorted(out) == ["a.weight", "b"]
    assert out["a.weight"].dtype == torch.bfloat16 and out["b"].dtype == torch.float32


def test_output_folder_appears_only_on_commit(tmp_path):
    model = model_folder(tmp_path / "m")
    output = OutputFolder(tmp_path / "runs" / "out", model=model)
    staging = output.create()
    (staging / "weights").write_text("w")
    assert not output.out.exists()
    output.commit({"num_samples": 3})
    assert json.loads((output.out / METRICS).read_text()) == {"num_samples": 3}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]


def test_output_folder_discard_leaves_nothing(tmp_path):
    output = OutputFolder(tmp_path / "out", model=model_folder(tmp_path / "m"))
    (output.create() / "half").write_text("x")
    output.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_earlier_output_is_replaced_but_nothing_else(tmp_path):
    model = model_folder(tmp_path / "m")
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / METRICS).write_text("{}")
    (earlier / "old").write_text("x")
    output = OutputFolder(earlier, model=model)
    output.create()
    output.commit({"new": True})
    assert sorted(p.name for p in earlier.iterdir()) == [METRICS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not an earlier training output"):
        OutputFolder(other, model=model)
    with pytest.raises(ConfigError, match="must not be the model folder or inside it"):
        OutputFolder(model / "out", model=model)
