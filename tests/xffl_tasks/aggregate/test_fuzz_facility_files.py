"""Fuzzing what a facility sends (issue 22): the only exception that may escape is AggregationError.

Real, valid folders are made once (a sharded model with its index, an adapter), then one file
of a client is mutated: bytes flipped, replaced, the file truncated, hostile pieces inserted
(brackets by the thousand, lone surrogate escapes, integers of thousands of digits, ``NaN``,
encoded surrogates, duplicate keys), in ``metrics.json``, ``model.safetensors.index.json``,
``adapter_config.json`` or a safetensors header (its JSON, or its raw first bytes). Each
mutated folder goes to the pull's check (``check_client_folder``) and to ``aggregate()`` beside
a good client with ``min_clients=1``: the check passes or raises AggregationError; the
aggregation completes (the good client always passes), leaving the mutated client out exactly
when the pull refuses it (but for what the pull cannot see: an output made non-finite).

Hypothesis runs derandomized (a fixed seed, the same examples on every run) with no example
database, so CI repeats it; about 20 s in all. Starts no process.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from xffl_tasks.adapter import LoraSettings, adapter_key, write_adapter_config
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.client_check import check_client_folder

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
PAYLOADS = [
    b"[" * 5000, b"{" * 3000, b"]" * 10, b'"\\ud800"', b"\\ud800", b"\\udfff\\ud83d",
    b"9" * 5000, b"18446744073709551616", b"-0", b"1e999", b"NaN", b"-Infinity",
    b'"a": 1, "a": 2', b"\xed\xa0\x80", b"\xff\xfe", b"\xef\xbb\xbf", b"\x00", b"\\", b'"',
    b",", b":", b"null", b"true", b"[]", b"{}", b"1e308", b"4611686018427387904",
]  # fmt: skip
#: Values that are JSON (or what Python's json reads) but hostile.
VALUES = [
    b'"\\ud800"', b'"x\\udfff"', b'"\\ud83d\\ude00"', b"9" * 5000, b"18446744073709551616",
    b"-0", b"1e999", b"NaN", b"Infinity", b"-1e308", b"1e-400", b"0.5", b"2.0", b"[[[[[[1]]]]]]",
    b"[]", b"{}", b"null", b"true", b'{"a": 1, "a": 2}', b'"' + b"x" * 70_000 + b'"',
    b"4611686018427387904", b"[0, 18446744073709551615]", b'"F16"', b'"I64"', b'"BF16"',
]  # fmt: skip
#: Keys likewise (the contents of the quotes).
KEYS = [b"\\ud800", b"__metadata__", b"", b"dtype", b"weight_map", b"num_samples", b"r", b"a"]
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.sampled_from(PAYLOADS)),
    st.tuples(st.just("replace"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("value"), st.integers(0, 1 << 16), st.sampled_from(VALUES)),
    st.tuples(st.just("key"), st.integers(0, 1 << 16), st.sampled_from(KEYS)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 16)),
)
#: A value after a colon or in an array (scalars, and arrays or objects of scalars).
_VALUE = re.compile(
    rb'(?<=[:\[,])\s*("(?:[^"\\]|\\.)*"|[-\w.+]+|\[[^\[\]{}]*\]|\{[^\[\]{}]*\})(?!\s*:)'
)
_KEY = re.compile(rb'"((?:[^"\\]|\\.)*)"(?=\s*:)')
_PAIR = re.compile(rb'"(?:[^"\\]|\\.)*"\s*:\s*(?:"(?:[^"\\]|\\.)*"|[-\w.+]+|\[[^\[\]{}]*\])')
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, position = mutation[0], mutation[1] % (len(data) + 1)
    if kind in ("value", "key", "duplicate"):  # JSON-aware: hostile content, valid syntax
        found = list({"value": _VALUE, "key": _KEY, "duplicate": _PAIR}[kind].finditer(data))
        if not found:
            return data
        match = found[mutation[1] % len(found)]
        if kind == "duplicate":
            return data[: match.end()] + b", " + match.group(0) + data[match.end() :]
        return data[: match.start(1)] + mutation[2] + data[match.end(1) :]
    if kind == "flip":
        position = min(position, len(data) - 1)
        return data[:position] + bytes([data[position] ^ mutation[2]]) + data[position + 1 :]
    if kind == "truncate":
        return data[:position]
    if kind == "insert":
        return data[:position] + mutation[2] + data[position:]
    return data[:position] + mutation[2] + data[position + len(mutation[2]) :]


def mutate_file(path: Path, target: str, mutation: tuple) -> None:
    raw = path.read_bytes()
    if target == "header":  # the JSON, its length rewritten to match
        (length,) = struct.unpack("<Q", raw[:8])
        text = mutate(raw[8 : 8 + length], mutation)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    elif target == "prefix":  # the raw first bytes, length included
        (length,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(mutate(raw[: 8 + length], mutation) + raw[8 + length :])
    else:
        path.write_bytes(mutate(raw, mutation))


def metrics(folder: Path, samples: int) -> None:
    text = {"num_samples": samples, "val_loss_before": 2.5, "device": "cpu", "data": {"n": 3}}
    (folder / "metrics.json").write_text(json.dumps(text))


def full_model(folder: Path, scale: float, samples: int | None) -> Path:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(int(scale * 100))
    first = {"a": torch.randn(3, 4, generator=generator) * scale, "n": torch.arange(2)}
    second = {"b": (torch.randn(5, generator=generator) * scale).to(torch.bfloat16)}
    weight_map = {}
    for file, tensors in zip(SHARDS, (first, second)):
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": 70}, "weight_map": weight_map})
    )
    if samples is not None:
        metrics(folder, samples)
    return folder


MODULE = "model.layers.0.self_attn.q_proj"


def adapter(folder: Path, value: float, samples: int | None) -> Path:
    folder.mkdir(parents=True)
    tensors = {
        adapter_key(MODULE, "A"): torch.full((2, 4), value),
        adapter_key(MODULE, "B"): torch.full((3, 2), value / 2),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder, LoraSettings(r=2, alpha=4.0, target_modules=("q_proj",)))
    if samples is not None:
        metrics(folder, samples)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return root, {
        False: (full_model(root / "full-prev", 1.0, None), full_model(root / "full-good", 1.1, 10),
                full_model(root / "full-victim", 1.2, 30)),
        True: (adapter(root / "lora-prev", 0.0, None), adapter(root / "lora-good", 0.1, 10),
               adapter(root / "lora-victim", 0.2, 30)),
    }  # fmt: skip


#: (adapter, file, target)
TARGETS = [
    (False, "metrics.json", "file"),
    (False, INDEX, "file"),
    (False, SHARDS[0], "header"),
    (False, SHARDS[1], "prefix"),
    (True, "metrics.json", "file"),
    (True, "adapter_config.json", "file"),
    (True, "adapter_model.safetensors", "header"),
    (True, "adapter_model.safetensors", "prefix"),
]
#: Rejections the pull cannot foresee: the output, not the client's files.
UNFORESEEABLE = ("output non-finite",)


@pytest.mark.parametrize(("is_adapter", "file", "target"), TARGETS)
@FUZZ
@given(mutation=MUTATIONS, variant=st.integers(0, 1))
def test_a_mutated_file_is_read_or_refused_never_a_crash(
    folders, is_adapter, file, target, mutation, variant
):
    root, made = folders
    previous, good, victim = made[is_adapter]
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        client = Path(shutil.copytree(victim, Path(scratch) / "victim"))
        mutate_file(client / file, target, mutation)
        try:
            check_client_folder(
                previous, client, name="victim", adapter=is_adapter, read_values=True
            )
            refused = None
        except AggregationError as error:
            refused = str(error)
        strategy = (("lora-fedavg", "lora-svd") if is_adapter else ("fedavg", "median"))[variant]
        report = aggregate(
            previous, [good, client], Path(scratch) / "out", strategy=strategy,
            names=["good", "victim"], min_clients=1, norm_bound=4.0 if variant else None,
        )  # fmt: skip
        rejected = report["rejected"].get("victim")
        if refused is not None:
            assert rejected == refused
        elif rejected is not None:
            assert any(words in rejected for words in UNFORESEEABLE), rejected
