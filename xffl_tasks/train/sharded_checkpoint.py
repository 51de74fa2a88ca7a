"""FSDP2's output: each rank writes its own shards, then rank 0 consolidates them. No pickle.

Under FSDP2 no process holds the whole model. Instead of gathering every tensor into rank 0's
memory through a collective, every rank writes the shards it holds into one safetensors file,
``.shards/rank-<rank, 5 digits>.safetensors`` in a folder every rank can see, and rank 0 then
reads them all back, with no collective, into whole tensors on its CPU. Those go through the
same writer as DDP's (``write_model`` or ``write_adapter``), so the published folder has the
same layout whatever the parallelism. The shard files are written inside the output's hidden
staging folder and removed before it is published: they never leave the facility.

A rank file holds, under each state-dict name, that rank's local tensor of the parameter (the
DTensor's ``to_local()``, without the padding FSDP2 may keep behind it), in the dtype it was
trained in. Its ``__metadata__`` says where each piece belongs, as JSON strings:

- ``"__xffl_shards__"``: ``{"format": 1, "rank": 1, "world_size": 2}``;
- one entry per tensor, under its name: ``{"shape": [5, 3], "dtype": "F32", "dim": 0,
  "offset": 3}``: the whole tensor's shape and dtype, the dimension it is sharded along and
  where this piece starts on it (its length is the stored tensor's). A tensor that is not
  sharded (replicated, or not a DTensor) has ``"dim": null`` and ``"offset": 0`` and is written
  by the first rank of its mesh alone.

The placements are read from each DTensor (its mesh and placements, through the function
DTensor itself places its shards with), never assumed: FSDP2 shards dim 0 in
``torch.chunk``'s way, so a dim 0 that does not divide by the world size gives uneven pieces
and possibly empty ones. Rank 0 reads the files with the safetensors library and each JSON
string with ``bounded_json.load_json`` (bounded, strict), and checks that the pieces of each
tensor agree on its shape and dtype and cover it exactly (no gap, no overlap); errors name the
tensor and the rank file.

Why not ``torch.distributed.checkpoint`` (DCP): its save exchanges the ranks' plans as
pickled objects (``gather_object``, ``scatter_object``), its FileSystemWriter stores the
checkpoint's plan in a ``.metadata`` file as a pickle, and FileSystemReader loads it with
``pickle.load``; the project loads no pickle, not even one it wrote itself.

With an adapter only the LoRA tensors are written (the frozen base would be the whole model
again, every round).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xffl_tasks.aggregate.bounded_json import JSONError, load_json
from xffl_tasks.aggregate.safetensors_format import DTYPES, build_header
from xffl_tasks.train.config import TrainingError

SHARDS = ".shards"  # inside the staging folder; removed before publishing
FORMAT_KEY = "__xffl_shards__"  # the rank file's own record in __metadata__
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 4096  # one JSON string of __metadata__
MAX_DIMS = 64  # torch's own limit
_DTYPE_NAMES = {dtype.torch: name for name, dtype in DTYPES.items()}


def is_adapter_tensor(name: str) -> bool:
    """A LoRA tensor of a PEFT model's state dict (what PEFT saves, for ``bias="none"``)."""
    return "lora_" in name


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


@dataclass(frozen=True)
class Placement:
    """Where a stored piece belongs: the whole tensor's ``shape`` and ``dtype`` (a safetensors
    dtype name), and the ``dim`` the tensor is sharded along (None: not sharded) with the
    ``offset`` the piece starts at on it."""

    shape: tuple[int, ...]
    dtype: str
    dim: int | None
    offset: int

    def to_json(self) -> str:
        record = {"shape": list(self.shape), "dtype": self.dtype, "dim": self.dim}
        return json.dumps({**record, "offset": self.offset}, separators=(",", ":"))


@dataclass(frozen=True)
class Piece:
    """One tensor's piece in one rank file: ``length`` along ``placement.dim``."""

    name: str
    file: Path
    placement: Placement
    length: int


# -- writing: every rank ------------------------------------------------------------------------


def local_shard(
    name: str, tensor: torch.Tensor, rank: int
) -> tuple[Placement, torch.Tensor] | None:
    """This rank's piece of ``tensor`` and its placement; None if another rank writes it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtype = _DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise TrainingError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
    shape = tuple(tensor.shape)
    if not isinstance(tensor, DTensor):
        return (Placement(shape, dtype, None, 0), tensor) if rank == 0 else None
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    local = tensor.to_local()
    if mesh.ndim != 1 or len(placements) != 1:
        raise TrainingError(
            f"tensor {name!r}: placements {placements} over a {mesh.ndim}-D mesh; only one "
            "Shard or Replicate placement over a 1-D mesh is written"
        )
    (placement,) = placements
    if type(placement) is Replicate:
        if mesh.get_local_rank() != 0:
            return None
        return Placement(shape, dtype, None, 0), local
    if type(placement) is not Shard:  # Partial, _StridedShard...
        raise TrainingError(f"tensor {name!r}: placement {placement} is not written")
    dim = placement.dim % len(shape)
    piece_shape, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    length = piece_shape[dim]
    held = tuple(local.shape)
    if (
        len(held) != len(shape)
        or held[dim] < length
        or any(held[d] != shape[d] for d in range(len(shape)) if d != dim)
    ):
        raise TrainingError(
            f"tensor {name!r}: rank {rank} holds a local tensor of shape {list(held)}, but its "
            f"placement {placement} gives rows {offsets[dim]} to {offsets[dim] + length} of {list(shape)}"
        )
    # FSDP2 pads every shard to the largest one; the padding, if shown, is at the end.
    return Placement(shape, dtype, dim, offsets[dim]), local.narrow(dim, 0, length)


def write_rank_file(
    folder: Path, rank: int, world_size: int, pieces: list[tuple[str, Placement, torch.Tensor]]
) -> Path:
    """Writes one rank's pieces as ``folder/rank-NNNNN.safetensors``, one tensor at a time
    (each copied to the CPU on its own), and syncs it to disk."""
    metadata = {
        FORMAT_KEY: json.dumps({"format": FORMAT_VERSION, "rank": rank, "world_size": world_size})
    }
    for name, placement, _ in pieces:
        if name == FORMAT_KEY:
            raise TrainingError(f"tensor {name!r}: the name is reserved by the shard file format")
        metadata[name] = placement.to_json()
    header = build_header(  # each tensor as it is; the record says what it should be
        ((name, DTYPES[_DTYPE_NAMES[t.dtype]], tuple(t.shape)) for name, _, t in pieces), metadata
    )
    folder.mkdir(exist_ok=True)  # every rank may be first; the staging folder must exist
    path = folder / rank_file(rank)
    with open(path, "xb") as file:
        file.write(header.header_bytes)
        for _, _, tensor in pieces:
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            file.write(memoryview(data.view(torch.uint8).numpy()))
        file.flush()
        os.fsync(file.fileno())
    return path


def save_shards(
    model: torch.nn.Module, folder: Path, *, keep: Callable[[str], bool] | None = None
) -> None:
    """A collective: every rank writes its pieces of ``model``'s state dict (its DTensors)
    into its own file in ``folder``; with ``keep``, only the tensors whose names it accepts.
    Returns when every rank has written; if one could not, every rank raises."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    error: Exception | None = None
    try:
        pieces = []
        for name, tensor in model.state_dict().items():
            if keep is None or keep(name):
                found = local_shard(name, tensor, rank)
                if found is not None:
                    pieces.append((name, *found))
        write_rank_file(folder, rank, world_size, pieces)
    except Exception as caught:  # noqa: BLE001 - every rank must learn of it first
        error = caught
    failed = torch.zeros(world_size, dtype=torch.int32)  # on the CPU: gloo, even beside NCCL
    failed[rank] = 0 if error is None else 1
    dist.all_reduce(failed)  # also the barrier: every rank file is complete after it
    if error is not None:
        raise error
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise TrainingError(f"rank(s) {ranks} could not write their shard files; see their logs")


# -- reading: rank 0 ----------------------------------------------------------------------------


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _record(text: str, keys: set[str], where: str) -> dict[str, Any]:
    """One JSON string of ``__metadata__``: an object with exactly ``keys``."""
    try:
        value = load_json(
            text.encode("utf-8", "surrogatepass"), max_bytes=MAX_RECORD_BYTES, max_depth=2
        )
    except JSONError as error:
        raise TrainingError(f"{where}: the record {error}") from None
    if not isinstance(value, dict) or set(value) != keys:
        raise TrainingError(f"{where}: the record is not an object with exactly {sorted(keys)}")
    return value


def parse_placement(text: str, where: str) -> Placement:
    """A tensor's record, checked: shape a list of counts, a known dtype, ``dim`` one of its
    dimensions (or null, with offset 0), ``offset`` a count within that dimension."""
    record = _record(text, {"shape", "dtype", "dim", "offset"}, where)
    shape, dtype, dim, offset = (record[k] for k in ("shape", "dtype", "dim", "offset"))
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(_count, shape)):
        raise TrainingError(f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} counts")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise TrainingError(f"{where}: unknown dtype {dtype!r}")
    if dim is None:
        if not _count(offset) or offset != 0:
            raise TrainingError(f"{where}: offset {offset!r} of a tensor that is not sharded")
    elif not _count(dim) or dim >= len(shape):
        raise TrainingError(f"{where}: dim {dim!r} is not one of the shape's {len(shape)}")
    elif not _count(offset) or offset > shape[dim]:
        raise TrainingError(
            f"{where}: offset {offset!r} is not a count within dim {dim} ({shape[dim]})"
        )
    return Placement(tuple(shape), dtype, dim, offset)


def read_pieces(path: Path, rank: int, world_size: int) -> list[Piece]:
    """The pieces of one rank file, each checked against what the file stores."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            slices = {name: file.get_slice(name) for name in file.offset_keys()}  # written order
            stored = {n: (s.get_dtype(), tuple(s.get_shape())) for n, s in slices.items()}
    except (OSError, SafetensorError) as error:
        raise TrainingError(f"{path}: not a readable shard file: {error}") from None
    if FORMAT_KEY not in metadata:
        raise TrainingError(f"{path}: not a shard file (no {FORMAT_KEY} in its __metadata__)")
    own = _record(metadata[FORMAT_KEY], {"format", "rank", "world_size"}, f"{path}: {FORMAT_KEY}")
    if own != {"format": FORMAT_VERSION, "rank": rank, "world_size": world_size}:
        raise TrainingError(
            f"{path}: says {own}, expected format {FORMAT_VERSION}, rank {rank} of {world_size}"
        )
    described = set(metadata) - {FORMAT_KEY}
    if described != set(stored):
        odd = sorted(described ^ set(stored))
        raise TrainingError(f"{path}: tensor {odd[0]!r} is stored or described, not both")
    pieces = []
    for name, (dtype, shape) in stored.items():
        where = f"{path}: tensor {name!r}"
        placement = parse_placement(metadata[name], where)
        whole, dim = placement.shape, placement.dim
        if dtype != placement.dtype:
            raise TrainingError(f"{where}: stored as {dtype}, its record says {placement.dtype}")
        if dim is None and shape != whole:
            raise TrainingError(
                f"{where}: stored shape {list(shape)}, its record says {list(whole)}"
            )
        if dim is not None and (
            len(shape) != len(whole)
            or any(shape[d] != whole[d] for d in range(len(whole)) if d != dim)
            or placement.offset + shape[dim] > whole[dim]
        ):
            raise TrainingError(
                f"{where}: stored shape {list(shape)} at offset {placement.offset} of dim {dim} "
                f"is not a piece of {list(whole)}"
            )
        pieces.append(Piece(name, path, placement, shape[dim] if dim is not None else 0))
    return pieces


def check_cover(name: str, pieces: list[Piece]) -> Placement:
    """The tensor's placement, once its pieces agree on it and cover it exactly."""
    first = pieces[0].placement
    for piece in pieces[1:]:
        if piece.placement.shape != first.shape or piece.placement.dtype != first.dtype:
            raise TrainingError(
                f"tensor {name!r}: {pieces[0].file} says {list(first.shape)} {first.dtype}, "
                f"{piece.file} says {list(piece.placement.shape)} {piece.placement.dtype}"
            )
        if piece.placement.dim != first.dim:
            raise TrainingError(
                f"tensor {name!r}: sharded along dim {first.dim} in {pieces[0].file}, "
                f"dim {piece.placement.dim} in {piece.file}"
            )
    if first.dim is None:
        if len(pieces) > 1:
            raise TrainingError(
                f"tensor {name!r}: whole in both {pieces[0].file} and {pieces[1].file}"
            )
        return first
    position, previous = 0, None
    for piece in sorted((p for p in pieces if p.length), key=lambda p: p.placement.offset):
        start = piece.placement.offset
        if start > position:
            raise TrainingError(
                f"tensor {name!r}: rows {position} to {start} of dim {first.dim} are in no shard "
                f"file (a gap before the piece of {piece.file})"
            )
        if start < position:
            raise TrainingError(
                f"tensor {name!r}: the piece of {piece.file} (rows {start} to {start + piece.length}"
                f" of dim {first.dim}) overlaps the piece of {previous}"
            )
        position, previous = start + piece.length, piece.file
    if position != first.shape[first.dim]:
        raise TrainingError(
            f"tensor {name!r}: rows {position} to {first.shape[first.dim]} of dim {first.dim} "
            "are in no shard file (a gap at the end)"
        )
    return first


def consolidate(folder: Path, *, world_size: int) -> dict[str, torch.Tensor]:
    """The whole tensors of the rank files in ``folder``, on this process's CPU, in the dtypes
    they were saved in. No collective: rank 0 alone calls it. Raises TrainingError naming the
    tensor and the file if the folder is not exactly the ``world_size`` rank files, or if any
    tensor's pieces disagree or do not cover it exactly."""
    from safetensors import SafetensorError, safe_open

    expected = [rank_file(rank) for rank in range(world_size)]
    try:
        present = sorted(entry.name for entry in folder.iterdir())
    except OSError as error:
        raise TrainingError(f"{folder}: cannot read the shard files: {error}") from None
    if sorted(expected) != present:
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        raise TrainingError(
            f"{folder}: expected the {world_size} rank files; missing {missing}, unexpected {extra}"
        )
    by_name: dict[str, list[Piece]] = {}
    by_file = [read_pieces(folder / name, rank, world_size) for rank, name in enumerate(expected)]
    for piece in (piece for pieces in by_file for piece in pieces):
        by_name.setdefault(piece.name, []).append(piece)
    state = {}
    for name, pieces in by_name.items():
        placement = check_cover(name, pieces)
        state[name] = torch.empty(placement.shape, dtype=DTYPES[placement.dtype].torch)
    for file_name, pieces in zip(expected, by_file):
        path = folder / file_name
        try:
            with safe_open(str(path), framework="pt") as file:
                for piece in pieces:
                    _copy_piece(state[piece.name], piece, file.get_tensor(piece.name))
        except (OSError, SafetensorError) as error:
            raise TrainingError(f"{path}: cannot read the shard file: {error}") from None
    return state


def _copy_piece(whole: torch.Tensor, piece: Piece, data: torch.Tensor) -> None:
    dim = piece.placement.dim
    target = whole if dim is None else whole.narrow(dim, piece.placement.offset, piece.length)
    if data.shape != target.shape or data.dtype != target.dtype:  # copy_ would broadcast
        raise TrainingError(
            f"{piece.file}: tensor {piece.name!r}: read {list(data.shape)} {data.dtype}, "
            f"expected {list(target.shape)} {target.dtype}: the file changed?"
        )
    target.copy_(data)


def remove_shards(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
