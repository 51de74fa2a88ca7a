"""Planning the streaming pass: chunk sizes, chunks, which files are read front to back. Pure."""

from __future__ import annotations

from pathlib import Path

from xffl_tasks.aggregate.engine import (
    DEFAULT_MEMORY_BUDGET,
    MAX_CHUNK_ELEMENTS,
    MIN_CHUNK_ELEMENTS,
    SLOTS,
    choose_chunk_elements,
    files_read_in_order,
    split,
)
from xffl_tasks.aggregate.model_folder import Shard, TensorLocation
from xffl_tasks.aggregate.safetensors_format import DTYPES, SafetensorsHeader, TensorEntry


def test_split():
    assert list(split(10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(split(8, 4)) == [(0, 4), (4, 4)]
    assert list(split(0, 4)) == []


def buffer_bytes(chunk: int, clients: int, states: int, itemsize: int) -> int:
    """The buffers the pass holds for ``chunk`` elements, as the engine allocates them."""
    reads = (1 + clients) * itemsize + states * 4
    work = (1 + clients) * 4 + (3 + 2 * states) * 4 + itemsize
    return chunk * SLOTS * (reads + work)


def test_chunks_shrink_with_clients_so_buffers_stay_in_budget():
    sizes = [choose_chunk_elements(clients=k, states=2, itemsize=2) for k in (1, 4, 16, 64, 256)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == MAX_CHUNK_ELEMENTS
    for clients, chunk in zip((1, 4, 16, 64, 256), sizes):
        assert MIN_CHUNK_ELEMENTS <= chunk
        assert buffer_bytes(chunk, clients, 2, 2) <= DEFAULT_MEMORY_BUDGET


def location(file: str, name: str, begin: int, size: int = 4) -> TensorLocation:
    entry = TensorEntry(name, DTYPES["F32"], (size // 4,), begin, begin + size)
    return TensorLocation(Shard(file, Path(file), SafetensorsHeader((), None, b"")), entry)


def test_files_read_in_order():
    a1, a2, b1, b2 = (
        location("a", "x", 0),
        location("a", "y", 4),
        location("b", "z", 0),
        location("b", "w", 4),
    )
    assert files_read_in_order([a1, b1, a2, b2]) == {"a", "b"}
    assert files_read_in_order([a1, b2, a2, b1]) == {"a"}
    empty = location("a", "e", 4, size=0)  # an empty tensor at the same offset reads nothing
    assert files_read_in_order([a1, a2, empty]) == {"a"}
