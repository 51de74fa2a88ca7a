"""A Hugging Face model folder's safetensors weights: which file holds which tensor.

A folder holds either ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(its ``weight_map``: tensor name -> shard file). Every header is parsed and validated here,
before any tensor data is read, and tensors are keyed by name: two folders may shard the same
model differently. Pickle checkpoints (``.bin``, ``.pt``, ...) are refused, never opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xffl_tasks.aggregate.bounded_json import JSONError, load_json
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.safetensors_format import (
    HeaderError,
    SafetensorsHeader,
    TensorEntry,
    read_header,
)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: The largest index read (a model of 100,000 tensors needs about 10 MB).
MAX_INDEX_BYTES = 32 << 20
#: ``{"metadata": {...}, "weight_map": {...}}``: two levels; one more for what metadata holds.
MAX_INDEX_DEPTH = 3
#: Suffixes of pickle-based checkpoints: refused wherever they appear in a model folder.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a model folder: its name in the folder, path and header."""

    file: str
    path: Path
    header: SafetensorsHeader


@dataclass(frozen=True)
class TensorLocation:
    shard: Shard
    entry: TensorEntry

    @property
    def offset(self) -> int:
        """Where the tensor's bytes start in its file."""
        return self.shard.header.data_start + self.entry.begin


@dataclass(frozen=True)
class ModelFolder:
    """The weights of one model folder; ``label`` names it in messages (``client 'site1'``)."""

    label: str
    path: Path
    shards: tuple[Shard, ...]
    index_file: str | None
    tensors: Mapping[str, TensorLocation]

    def error(self, message: str) -> AggregationError:
        return AggregationError(f"{self.label}: {message}")


def _listing(path: Path, label: str) -> list[Path]:
    if not path.is_dir():
        raise AggregationError(f"{label}: {path} is not a directory")
    return sorted(path.iterdir())


def refuse_pickles(path: Path, label: str) -> None:
    """Raises if the folder holds a pickle checkpoint (never loaded: loading runs code)."""
    for entry in _listing(path, label):
        if entry.name.lower().endswith(PICKLE_SUFFIXES):
            raise AggregationError(
                f"{label}: pickle checkpoint {entry.name!r} in {path} is refused "
                "(only safetensors weights are read; save with safe_serialization)"
            )


def _shard(folder: Path, file: str, label: str) -> Shard:
    path = folder / file
    if not path.is_file():
        raise AggregationError(
            f"{label}: shard {file!r} named by {INDEX_FILE} is missing from {folder}"
        )
    try:
        header = read_header(path)
    except HeaderError as error:
        raise AggregationError(f"{label}: {file}: {error}") from None
    return Shard(file, path, header)


def _read_weight_map(path: Path, label: str) -> dict[str, str]:
    with open(path, "rb") as file:
        data = file.read(MAX_INDEX_BYTES + 1)
    try:
        index = load_json(data, max_bytes=MAX_INDEX_BYTES, max_depth=MAX_INDEX_DEPTH)
    except JSONError as error:
        raise AggregationError(f"{label}: {INDEX_FILE} {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AggregationError(
            f"{label}: {INDEX_FILE} has no weight_map (tensor name -> shard file)"
        )
    for name, file in weight_map.items():
        if (
            not isinstance(file, str)
            or "/" in file
            or "\\" in file
            or file in (".", "..")
            or not file.endswith(".safetensors")
        ):
            raise AggregationError(
                f"{label}: {INDEX_FILE} maps tensor {name!r} to {file!r}, not a .safetensors file of the folder"
            )
    return weight_map


def open_model_folder(path: Path, *, label: str) -> ModelFolder:
    """Parses and cross-checks every safetensors header of the model folder at ``path``."""
    path = Path(path)
    refuse_pickles(path, label)
    weight_files = {
        p.name for p in _listing(path, label) if p.name.endswith(".safetensors") and p.is_file()
    }
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_weight_map(index_path, label)
        shard_files = sorted(set(weight_map.values()))
        index_file: str | None = INDEX_FILE
    elif WEIGHTS_FILE in weight_files:
        weight_map, shard_files, index_file = {}, [WEIGHTS_FILE], None
    else:
        raise AggregationError(f"{label}: no {WEIGHTS_FILE} and no {INDEX_FILE} in {path}")
    stray = sorted(weight_files - set(shard_files))
    if stray:
        raise AggregationError(
            f"{label}: {stray[0]!r} in {path} is not one of the model's weight files"
            + (f" (not in {INDEX_FILE})" if index_file else "")
        )
    shards = tuple(_shard(path, file, label) for file in shard_files)
    tensors: dict[str, TensorLocation] = {}
    for shard in shards:
        for entry in shard.header.tensors:
            if entry.name in tensors:
                raise AggregationError(
                    f"{label}: tensor {entry.name!r} is in both {tensors[entry.name].shard.file} and {shard.file}"
                )
            if index_file and weight_map.get(entry.name) != shard.file:
                raise AggregationError(
                    f"{label}: tensor {entry.name!r} is in {shard.file} but {INDEX_FILE} places it in "
                    f"{weight_map.get(entry.name)!r}"
                )
            tensors[entry.name] = TensorLocation(shard, entry)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise AggregationError(
            f"{label}: tensor {missing[0]!r} is in {INDEX_FILE} but not in {weight_map[missing[0]]}"
        )
    return ModelFolder(label, path, shards, index_file, tensors)


def check_same_tensors(previous: ModelFolder, client: ModelFolder) -> None:
    """Raises unless the client has exactly the previous model's tensors, shapes and dtypes."""
    extra = sorted(set(client.tensors) - set(previous.tensors))
    if extra:
        raise client.error(
            f"tensor {extra[0]!r} is not in the previous global model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    missing = sorted(set(previous.tensors) - set(client.tensors))
    if missing:
        raise client.error(
            f"lacks tensor {missing[0]!r} of the previous global model"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for name, location in previous.tensors.items():
        theirs = client.tensors[name].entry
        if theirs.shape != location.entry.shape:
            raise client.error(
                f"tensor {name!r} has shape {list(theirs.shape)}, the previous global model "
                f"{list(location.entry.shape)}"
            )
        if theirs.dtype != location.entry.dtype:
            raise client.error(
                f"tensor {name!r} has dtype {theirs.dtype.name}, the previous global model "
                f"{location.entry.dtype.name}"
            )
