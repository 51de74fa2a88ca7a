"""FSDP2's sharded checkpoint in this process: the tiny model sharded by ``fully_shard`` over a
one-process gloo group, its shards written as our own safetensors rank files and consolidated
back (with no pickle loaded anywhere); uneven FSDP2 shards from a two-rank fake process group
(one rank at a time in this process); rank files that disagree or do not cover a tensor,
refused; and the bounded loss curve of metrics.json. The two-process runs are in test_fsdp.py.

Starts: a one-process gloo process group in this process (a HashStore, no port), or a
two-rank ``fake`` one (torch's testing backend: no communication), destroyed at the end of
each test that makes one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from xffl_tasks.launch import DistributedLaunch
from xffl_tasks.train import sharded_checkpoint
from xffl_tasks.train.checkpoint import inspect_model_folder, load_model
from xffl_tasks.train.config import TrainingConfig, TrainingError
from xffl_tasks.train.distributed import Runtime, build_model, full_state_dict
from xffl_tasks.train.loop import MAX_CURVE_POINTS, loss_curve
from xffl_tasks.train.sharded_checkpoint import Placement, consolidate, write_rank_file

ALONE = DistributedLaunch(0, 0, 1, 1, "127.0.0.1", 0, "single")
FSDP = Runtime(ALONE, torch.device("cpu"), "fp32", "fsdp")


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_tiny(tiny, adapter=None):
    source = inspect_model_folder(tiny / "model")
    model, plain = build_model(source, TrainingConfig(), FSDP, adapter)
    return source, model, plain


def test_the_sharding_plan_each_decoder_layer_then_the_root(tiny, group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    _, model, _ = sharded_tiny(tiny)
    sharded = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    assert sharded == ["FSDPLlamaForCausalLM"] + ["FSDPLlamaDecoderLayer"] * 4  # FSDP2 renames
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, DTensor) and parameter.placements == (Shard(0),), name


def test_shards_consolidate_to_the_loaded_weights_and_are_removed(tiny, group, tmp_path):
    source, model, plain = sharded_tiny(tiny)
    state = full_state_dict(model, plain, FSDP, staging=tmp_path)
    expected = load_model(source).state_dict()
    assert sorted(state) == sorted(expected)  # tied lm_head included, as DDP's state dict has it
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
        assert state[name].device.type == "cpu" and not hasattr(state[name], "placements")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_writes_only_its_lora_tensors(tiny, group, tmp_path, monkeypatch):
    from xffl_tasks.train.adapter_training import adapter_shapes, plan_adapter

    adapter = plan_adapter(TrainingConfig(peft="lora", lora_r=4))
    _, model, plain = sharded_tiny(tiny, adapter)
    written = []
    save = sharded_checkpoint.save_shards

    def spy(model, folder, *, keep=None):
        save(model, folder, keep=keep)
        written.extend(sharded_checkpoint.consolidate(folder, world_size=1))

    monkeypatch.setattr(sharded_checkpoint, "save_shards", spy)
    state = full_state_dict(model, plain, FSDP, staging=tmp_path, adapter_only=True)
    assert sorted(written) == sorted(state) and all(".lora_" in name for name in state)
    assert len(state) == len(adapter_shapes(plain)) == 4 * 4 * 2  # 4 layers, q k v o, A and B


def test_a_failed_consolidation_raises_and_removes_the_shards(tiny, group, tmp_path, monkeypatch):
    _, model, plain = sharded_tiny(tiny)

    def unreadable(folder, *, world_size):
        raise OSError(f"{folder}: disk gone")

    monkeypatch.setattr(sharded_checkpoint, "consolidate", unreadable)
    with pytest.raises(OSError, match="disk gone"):
        full_state_dict(model, plain, FSDP, staging=tmp_path)
    assert list(tmp_path.iterdir()) == []


def refuse_every_pickle_load(monkeypatch) -> list:
    """Every way this process could load a pickle (pickle, _pickle, torch.load and its
    weights-only unpickler, the unpickler torch.distributed keeps) raises; returns the calls."""
    import _pickle
    import pickle

    import torch._weights_only_unpickler as weights_only
    import torch.distributed.distributed_c10d as c10d
    import torch.serialization

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a pickle was loaded")

    class Refusing:
        def __init__(self, *args, **kwargs):
            refuse(*args)

    for module in (pickle, _pickle, weights_only):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "Unpickler", Refusing)
    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "loads", refuse)
    for module in (torch, torch.serialization):
        monkeypatch.setattr(module, "load", refuse)
    monkeypatch.setattr(c10d, "_unpickler", Refusing)
    return calls


def test_a_build_save_and_consolidation_load_no_pickle(tiny, group, tmp_path, monkeypatch):
    calls = refuse_every_pickle_load(monkeypatch)
    opened, listed = [], []

    def spy_open(path, mode="r", *args, **kwargs):  # every file the module creates
        opened.append((Path(path).relative_to(tmp_path).as_posix(), mode))
        return open(path, mode, *args, **kwargs)

    def spy_consolidate(folder, *, world_size):
        listed.extend(sorted(p.name for p in folder.iterdir()))
        header = (folder / "rank-00000.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", header[:8])  # a safetensors header, not a pickle
        listed.append(json.loads(header[8 : 8 + length])["__metadata__"])
        return consolidate(folder, world_size=world_size)

    monkeypatch.setattr(sharded_checkpoint, "open", spy_open, raising=False)
    monkeypatch.setattr(sharded_checkpoint, "consolidate", spy_consolidate)
    source, model, plain = sharded_tiny(tiny)
    state = full_state_dict(model, plain, FSDP, staging=tmp_path)
    assert calls == []
    assert opened == [(".shards/rank-00000.safetensors", "xb")]
    files, metadata = listed[:-1], listed[-1]
    assert files == ["rank-00000.safetensors"]  # no .metadata, nothing but safetensors
    assert json.loads(metadata.pop("__xffl_shards__")) == {"format": 1, "rank": 0, "world_size": 1}
    assert sorted(metadata) == sorted(state)
    assert json.loads(metadata["lm_head.weight"]) == {
        "shape": list(state["lm_head.weight"].shape), "dtype": "F32", "dim": 0, "offset": 0
    }  # fmt: skip
    monkeypatch.undo()
    for name, tensor in load_model(source).state_dict().items():
        assert torch.equal(state[name], tensor), name


class Uneven(torch.nn.Module):
    """Parameters whose dim 0 does not divide by 2 (5, 1, 7 and 3 rows, fp32 and bf16), and
    a buffer, which stays a plain tensor under FSDP2 (rank 0 writes it whole)."""

    def __init__(self):
        super().__init__()
        self.odd = torch.nn.Parameter(torch.arange(15.0).reshape(5, 3))
        self.one = torch.nn.Parameter(torch.arange(4.0).reshape(1, 4))  # rank 1: no row
        self.vector = torch.nn.Parameter(torch.arange(7.0))
        self.low = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2).to(torch.bfloat16))
        self.register_buffer("steps", torch.arange(3))


def save_as_fake_rank(rank: int, folder) -> None:
    """``Uneven`` under ``fully_shard`` as ``rank`` of a two-rank fake group, its shards saved."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers "fake"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=2)
    try:
        # a mesh name of its own: FSDP2 would otherwise reuse an equal mesh of the previous
        # fake group in this process, and that group's rank with it
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=(f"fake{rank}",))
        model = fully_shard(Uneven(), mesh=mesh)
        local = model.odd.to_local()
        assert local.untyped_storage().nbytes() == 3 * 3 * 4  # FSDP2 pads rank 1's 2 rows to 3
        sharded_checkpoint.save_shards(model, folder)
    finally:
        dist.destroy_process_group()


def test_uneven_shards_consolidate_exactly(tmp_path):
    from safetensors import safe_open

    folder = tmp_path / ".shards"
    tmp_path.joinpath("not-a-staging-folder").mkdir()
    for rank in (0, 1):
        save_as_fake_rank(rank, folder)
    with safe_open(str(folder / "rank-00001.safetensors"), "pt") as file:
        stored = {name: list(file.get_slice(name).get_shape()) for name in file.keys()}
        records = {name: json.loads(file.metadata()[name]) for name in file.keys()}
    assert stored == {"odd": [2, 3], "one": [0, 4], "vector": [3], "low": [1, 2]}
    assert records["odd"] == {"shape": [5, 3], "dtype": "F32", "dim": 0, "offset": 3}
    assert records["vector"]["offset"] == 4 and records["low"]["dtype"] == "BF16"
    state = consolidate(folder, world_size=2)
    expected = Uneven().state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


W = torch.arange(15.0).reshape(5, 3)
B = torch.arange(3.0)


def piece(tensor, offset, *, name="w", shape=(5, 3), dtype="F32", dim=0):
    return name, Placement(shape, dtype, dim, offset), tensor


REFUSED = {
    "gap": (
        [piece(W[:3], 0)], [piece(W[4:], 4)],
        r"tensor 'w': rows 3 to 4 of dim 0 are in no shard file \(a gap before the piece of "
        r".*rank-00001\.safetensors\)",
    ),
    "gap at the end": (
        [piece(W[:3], 0)], [], r"tensor 'w': rows 3 to 5 of dim 0 are in no shard file \(a gap at the end\)"
    ),
    "overlap": (
        [piece(W[:3], 0)], [piece(W[2:], 2)],
        r"tensor 'w': the piece of .*rank-00001\.safetensors \(rows 2 to 5 of dim 0\) overlaps "
        r"the piece of .*rank-00000\.safetensors",
    ),
    "dtypes of two files": (
        [piece(W[:3], 0)], [piece(W[3:].bfloat16(), 3, dtype="BF16")],
        r"tensor 'w': .*rank-00000\.safetensors says \[5, 3\] F32, .*rank-00001\.safetensors "
        r"says \[5, 3\] BF16",
    ),
    "stored dtype against its record": (
        [piece(W[:3], 0)], [piece(W[3:].double(), 3)],
        r"rank-00001\.safetensors: tensor 'w': stored as F64, its record says F32",
    ),
    "shapes of two files": (
        [piece(W[:3], 0)], [piece(W[3:], 3, shape=(6, 3))],
        r"tensor 'w': .*rank-00000\.safetensors says \[5, 3\] F32, .*rank-00001\.safetensors "
        r"says \[6, 3\] F32",
    ),
    "a piece past the end": (
        [piece(W[:3], 0)], [piece(W[3:], 4)],
        r"rank-00001\.safetensors: tensor 'w': stored shape \[2, 3\] at offset 4 of dim 0 is "
        r"not a piece of \[5, 3\]",
    ),
    "a whole tensor twice": (
        [piece(B, 0, name="b", shape=(3,), dim=None)], [piece(B, 0, name="b", shape=(3,), dim=None)],
        r"tensor 'b': whole in both .*rank-00000\.safetensors and .*rank-00001\.safetensors",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED)
def test_rank_files_that_do_not_cover_a_tensor_exactly_are_refused(tmp_path, case):
    first, second, message = REFUSED[case]
    folder = tmp_path / ".shards"
    folder.mkdir()
    for rank, pieces in enumerate((first, second)):
        write_rank_file(folder, rank, 2, pieces)
    with pytest.raises(TrainingError, match=message):
        consolidate(folder, world_size=2)


def record(**changes) -> str:
    return json.dumps({"shape": [5, 3], "dtype": "F32", "dim": 0, "offset": 0, **changes})


FORMAT = json.dumps({"format": 1, "rank": 0, "world_size": 1})
MALFORMED = {
    "a key twice": ({"w": record()[:-1] + ', "dim": 0}'}, "tensor 'w': the record .*twice"),
    "a record too long": ({"w": record(pad=" " * 5000)}, "tensor 'w': the record is larger"),
    "an extra key": ({"w": record(rows=5)}, "tensor 'w': the record is not an object with exactly"),
    "a boolean offset": ({"w": record(offset=True)}, "tensor 'w': offset True is not a count"),
    "a dim beyond the shape": ({"w": record(dim=2)}, "tensor 'w': dim 2 is not one of"),
    "an unknown dtype": ({"w": record(dtype="F31")}, "tensor 'w': unknown dtype 'F31'"),
    "no record": ({}, "tensor 'w' is stored or described, not both"),
    "a record with no tensor": (
        {"w": record(), "v": record()},
        "tensor 'v' is stored or described, not both",
    ),
    "another rank's file": (
        {"w": record(), "__xffl_shards__": json.dumps({"format": 1, "rank": 1, "world_size": 1})},
        "expected format 1, rank 0 of 1",
    ),
    "no format record": ({"w": record(), "__xffl_shards__": None}, "not a shard file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_records_are_refused_naming_the_tensor(tmp_path, case):
    from safetensors.torch import save_file

    metadata, message = MALFORMED[case]
    metadata = {"__xffl_shards__": FORMAT, **metadata}
    metadata = {key: value for key, value in metadata.items() if value is not None}
    (tmp_path / ".shards").mkdir()
    save_file({"w": W}, str(tmp_path / ".shards" / "rank-00000.safetensors"), metadata)
    with pytest.raises(TrainingError, match=message):
        consolidate(tmp_path / ".shards", world_size=1)


def test_a_folder_of_other_files_is_refused(tmp_path):
    folder = tmp_path / ".shards"
    folder.mkdir()
    write_rank_file(folder, 0, 2, [piece(W, 0)])
    (folder / ".metadata").write_bytes(b"\x80\x04")  # e.g. DCP's pickle: never read
    with pytest.raises(
        TrainingError, match=r"missing \['rank-00001.safetensors'\], unexpected \['.metadata'\]"
    ):
        consolidate(folder, world_size=2)
    (folder / ".metadata").unlink()
    (folder / "rank-00001.safetensors").write_bytes(b"\x80\x04")
    with pytest.raises(TrainingError, match="rank-00001.safetensors: not a readable shard file"):
        consolidate(folder, world_size=2)


def test_loss_curve_is_every_step_up_to_its_limit_then_window_means():
    assert loss_curve([]) == (1, [])
    assert loss_curve([3.0, 2.0, 1.0]) == (1, [3.0, 2.0, 1.0])
    assert loss_curve([float(i) for i in range(MAX_CURVE_POINTS)]) == (
        1,
        [float(i) for i in range(MAX_CURVE_POINTS)],
    )
    every, points = loss_curve([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], limit=3)
    assert (every, points) == (3, [2.0, 5.0, 7.0])
    every, points = loss_curve([0.5] * 100_001)
    assert every == 501 and len(points) == 200 and set(points) == {0.5}
