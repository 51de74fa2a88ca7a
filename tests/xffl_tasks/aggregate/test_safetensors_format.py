"""Parsing and building safetensors headers from the format, on literal bytes. Starts nothing.

Files written here are read back by the reference ``safetensors`` library, and its files by us.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xffl_tasks.aggregate.safetensors_format import (
    DTYPES,
    MAX_HEADER_BYTES,
    HeaderError,
    build_header,
    parse_header,
    parse_header_length,
    read_header,
)


def header(entries: dict) -> bytes:
    return json.dumps(entries).encode()


A = {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
B = {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}


def test_parses_tensors_in_data_order_with_metadata():
    tensors, metadata = parse_header(header({"b": B, "__metadata__": {"format": "pt"}, "a": A}), 20)
    assert [(t.name, t.dtype.name, t.shape, t.begin, t.end) for t in tensors] == [
        ("a", "BF16", (2, 3), 0, 12),
        ("b", "F32", (2,), 12, 20),
    ]
    assert metadata == {"format": "pt"} and tensors[0].numel == 6 and tensors[1].nbytes == 8


def test_scalars_and_empty_tensors():
    entries = {
        "s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]},
        "e": {"dtype": "F16", "shape": [0, 4], "data_offsets": [8, 8]},
    }
    tensors, _ = parse_header(header(entries), 8)
    assert {t.name: t.numel for t in tensors} == {"s": 1, "e": 0}


@pytest.mark.parametrize(
    ("entries", "data_size", "words"),
    [
        ({"a": A, "b": B}, 16, ["'b'", "[12, 20]", "past the end", "out of bounds"]),
        ({"a": A, "b": {**B, "data_offsets": [10, 18]}}, 18, ["'b'", "overlaps", "'a'"]),
        ({"a": A, "b": {**B, "data_offsets": [14, 22]}}, 22, ["'b'", "hole", "'a'"]),
        ({"a": A}, 20, ["8 bytes after the last tensor"]),
        ({"a": {**A, "dtype": "F12"}}, 12, ["'a'", "unknown dtype 'F12'"]),
        ({"a": {**A, "shape": [2, 2]}}, 12, ["'a'", "[2, 2]", "BF16", "needs 8 bytes", "span 12"]),
        ({"a": {**A, "shape": [2, -3]}}, 12, ["'a'", "shape"]),
        ({"a": {**A, "shape": [2, True]}}, 12, ["'a'", "shape"]),
        ({"a": {**A, "data_offsets": [12, 0]}}, 12, ["'a'", "data_offsets"]),
        ({"a": {**A, "data_offsets": [0]}}, 12, ["'a'", "data_offsets"]),
        ({"a": {**A, "extra": 1}}, 12, ["'a'", "exactly dtype, shape and data_offsets"]),
        ({"a": A, "__metadata__": {"n": 1}}, 12, ["__metadata__"]),
    ],
)
def test_bad_headers_are_named(entries, data_size, words):
    with pytest.raises(HeaderError) as error:
        parse_header(header(entries), data_size)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b'{"a": 1, "a": 2}', ["'a' appears twice"]),
        (b'{"a": ', ["not valid JSON"]),
        (b"[1, 2]", ["not a JSON object"]),
        (b'{"\xff": 1}', ["not UTF-8"]),
    ],
)
def test_malformed_json_is_refused(text, words):
    with pytest.raises(HeaderError) as error:
        parse_header(text, 0)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    ("length", "file_size", "words"),
    [
        (100, 50, ["header length 100", "past the end of the file (50 bytes)"]),
        (0, 50, ["header length 0", "out of bounds"]),
        (MAX_HEADER_BYTES + 1, 2 * MAX_HEADER_BYTES, ["out of bounds"]),
        (2**64 - 1, 50, ["out of bounds"]),
    ],
)
def test_header_length_is_bounded(length, file_size, words):
    with pytest.raises(HeaderError) as error:
        parse_header_length(struct.pack("<Q", length), file_size)
    for word in words:
        assert word in str(error.value)
    with pytest.raises(HeaderError, match="too short"):
        parse_header_length(b"\x01\x00", 2)


def test_reads_what_the_reference_library_writes(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {
        "w": torch.ones(3, 2, dtype=torch.bfloat16),
        "i": torch.arange(4),
        "f": torch.zeros(1),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    parsed = read_header(path)
    assert {t.name: (t.dtype.name, t.shape) for t in parsed.tensors} == {
        "w": ("BF16", (3, 2)),
        "i": ("I64", (4,)),
        "f": ("F32", (1,)),
    }
    assert parsed.file_size == path.stat().st_size and parsed.metadata == {"format": "pt"}
    assert path.read_bytes()[: parsed.data_start] == parsed.header_bytes


def test_a_built_header_is_read_by_the_reference_library(tmp_path):
    built = build_header(
        [("m/x", DTYPES["F32"], (2, 2)), ("m/y", DTYPES["BF16"], (3,))], {"state": "momentum"}
    )
    assert len(built.header_bytes) % 8 == 0
    data = (
        torch.arange(4, dtype=torch.float32).numpy().tobytes()
        + torch.ones(3, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    path = tmp_path / "built.safetensors"
    path.write_bytes(built.header_bytes + data)
    assert built.file_size == path.stat().st_size
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == {"state": "momentum"}
        assert torch.equal(file.get_tensor("m/x"), torch.arange(4, dtype=torch.float32).view(2, 2))
        assert torch.equal(file.get_tensor("m/y"), torch.ones(3, dtype=torch.bfloat16))
    assert read_header(path).header_bytes == built.header_bytes
