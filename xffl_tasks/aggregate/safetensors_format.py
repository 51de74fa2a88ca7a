"""The safetensors file format, parsed and built from its specification.

A file is ``N`` (8 bytes, little-endian unsigned), a JSON header of ``N`` bytes, then the data
buffer. The header maps each tensor's name to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` (byte offsets into the data buffer) and may hold ``"__metadata__"``, a map of strings.
The tensors cover the buffer exactly: no holes, no overlaps, nothing after the last one.

Parsing checks all of that (header length and offsets within the file, known dtype names,
shapes that match the byte sizes, no duplicate names), so that readers can later ``pread`` a
tensor's bytes with no further checks. Nothing here ever unpickles anything.

A header accepted here is accepted by the ``safetensors`` library too (its Rust ``serde_json``
and torch), so that no reader of a facility's file fails after these checks passed: the JSON
is read by ``bounded_json.load_json`` (strict UTF-8, no lone surrogate escape, no key twice,
integers of at most 20 digits), and a shape's dimensions multiply to at most ``MAX_ELEMENTS``
even when one of them is zero (the library and torch refuse the overflow of any partial
product). ``load_tensors`` reads the tensors of a parsed file from its bytes, without the
library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from xffl_tasks.aggregate.bounded_json import JSONError, load_json
from xffl_tasks.aggregate.errors import AggregationError

#: The largest header accepted (the reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000
#: The reference writer pads the header with spaces so that the data starts 8-byte aligned.
HEADER_ALIGNMENT = 8
#: How deep a header may nest (object, tensor entry, shape), checked before parsing.
MAX_HEADER_DEPTH = 3
#: The most bytes ``__metadata__``'s keys and values may take together (UTF-8).
MAX_METADATA_BYTES = 64 << 10
#: The most elements a shape may describe, its zero dimensions counted as one (torch's int64
#: sizes and strides; the library's checked products of usize).
MAX_ELEMENTS = 2**63 - 1
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its name in headers, the torch dtype, bytes per element."""

    name: str
    torch: torch.dtype
    itemsize: int
    floating: bool

    @property
    def compute(self) -> torch.dtype:
        """The dtype arithmetic on this dtype runs in: float64 for F64, float32 otherwise."""
        return torch.float64 if self.torch == torch.float64 else torch.float32


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", torch.bool, 1, False),
        DType("U8", torch.uint8, 1, False),
        DType("I8", torch.int8, 1, False),
        DType("I16", torch.int16, 2, False),
        DType("U16", torch.uint16, 2, False),
        DType("I32", torch.int32, 4, False),
        DType("U32", torch.uint32, 4, False),
        DType("I64", torch.int64, 8, False),
        DType("U64", torch.uint64, 8, False),
        DType("F8_E4M3", torch.float8_e4m3fn, 1, True),
        DType("F8_E5M2", torch.float8_e5m2, 1, True),
        DType("F16", torch.float16, 2, True),
        DType("BF16", torch.bfloat16, 2, True),
        DType("F32", torch.float32, 4, True),
        DType("F64", torch.float64, 8, True),
    )
}


class HeaderError(AggregationError):
    """A safetensors header that breaks the format (the message names the tensor if any;
    callers add the file and the folder)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``begin``/``end`` are offsets into the data buffer."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: the tensors in data order, the metadata, the header's own bytes.

    ``header_bytes`` is the file's first ``8 + N`` bytes exactly as read: a file with the
    same tensors (names, dtypes, shapes) can reuse them verbatim.
    """

    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None
    header_bytes: bytes

    @property
    def data_start(self) -> int:
        return len(self.header_bytes)

    @property
    def file_size(self) -> int:
        return self.data_start + (self.tensors[-1].end if self.tensors else 0)


def parse_header_length(prefix: bytes, file_size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"is {file_size} bytes long: too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length == 0 or length > MAX_HEADER_BYTES:
        raise HeaderError(
            f"header length {length} is out of bounds (1 to {MAX_HEADER_BYTES} bytes)"
        )
    if 8 + length > file_size:
        raise HeaderError(
            f"header length {length} runs past the end of the file ({file_size} bytes): truncated?"
        )
    return length


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise HeaderError(f"tensor {name!r}: unknown dtype {raw['dtype']!r}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(
            f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers"
        )
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise HeaderError(
            f"tensor {name!r}: shape {shape!r} has dimensions whose product exceeds "
            f"{MAX_ELEMENTS} (even with a zero dimension, torch and safetensors refuse it)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise HeaderError(
            f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        )
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.numel * dtype.itemsize != entry.nbytes:
        raise HeaderError(
            f"tensor {name!r}: shape {list(shape)} of {dtype.name} needs "
            f"{entry.numel * dtype.itemsize} bytes but data_offsets {offsets} span {entry.nbytes}"
        )
    return entry


def _check_metadata(metadata: object) -> dict[str, str] | None:
    """``__metadata__``: a flat map of strings of at most ``MAX_METADATA_BYTES`` in all."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not a map of strings")
    size = sum(
        len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
        for k, v in metadata.items()
    )
    if size > MAX_METADATA_BYTES:
        raise HeaderError(
            f"__metadata__ holds {size} bytes of strings, more than {MAX_METADATA_BYTES}"
        )
    return metadata


def parse_header(
    text: bytes, data_size: int
) -> tuple[tuple[TensorEntry, ...], dict[str, str] | None]:
    """Parses and validates a JSON header for a data buffer of ``data_size`` bytes.

    Returns the tensors in data order and the ``__metadata__`` map (or None).
    """
    try:
        header = load_json(text, max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH)
    except JSONError as error:
        raise HeaderError(f"header {error}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = _check_metadata(header.pop("__metadata__", None))
    entries = sorted(
        (_parse_entry(name, raw) for name, raw in header.items()), key=lambda e: (e.begin, e.end)
    )
    position, previous = 0, None
    for entry in entries:
        if entry.end > data_size:
            raise HeaderError(
                f"tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] run past the end "
                f"of the data ({data_size} bytes): the file is truncated or the offsets are out of bounds"
            )
        if entry.begin != position:
            what = "overlaps" if entry.begin < position else "leaves a hole after"
            after = f"tensor {previous!r}" if previous else "the start of the data"
            raise HeaderError(
                f"tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] {what} {after}"
            )
        position, previous = entry.end, entry.name
    if position != data_size:
        raise HeaderError(f"{data_size - position} bytes after the last tensor belong to no tensor")
    return tuple(entries), metadata


def read_header(path: Path) -> SafetensorsHeader:
    """Reads and validates the header of the safetensors file at ``path`` (raises HeaderError)."""
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        length = parse_header_length(prefix, file_size)
        text = file.read(length)
    if len(text) != length:
        raise HeaderError(f"header of {length} bytes could not be read whole: the file changed?")
    tensors, metadata = parse_header(text, file_size - 8 - length)
    return SafetensorsHeader(tensors, metadata, prefix + text)


def load_tensors(data: bytes | bytearray, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file's bytes ``data``, as ``header`` (read from the
    same bytes) places them: copies, so aligned and writable. No library parses the bytes."""
    if len(data) != header.file_size or data[: header.data_start] != header.header_bytes:
        raise HeaderError(
            f"is not the file whose header was checked ({len(data)} bytes, the header describes "
            f"{header.file_size}): it changed?"
        )
    buffer = memoryview(data)
    tensors = {}
    for entry in header.tensors:
        if entry.nbytes == 0:
            tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype.torch)
            continue
        start = header.data_start + entry.begin
        raw = torch.frombuffer(bytearray(buffer[start : start + entry.nbytes]), dtype=torch.uint8)
        tensors[entry.name] = raw.view(entry.dtype.torch).reshape(entry.shape)
    return tensors


def build_header(
    specs: Iterable[tuple[str, DType, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> SafetensorsHeader:
    """The header of a new file holding ``specs`` (name, dtype, shape) in this order.

    The JSON is padded with spaces so that the data starts 8-byte aligned, as the reference
    writer does.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    entries, position = [], 0
    for name, dtype, shape in specs:
        if name in header:
            raise HeaderError(f"tensor {name!r} appears twice")
        end = position + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtype.name, "shape": list(shape), "data_offsets": [position, end]}
        entries.append(TensorEntry(name, dtype, tuple(shape), position, end))
        position = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return SafetensorsHeader(tuple(entries), metadata, struct.pack("<Q", len(text)) + text)
