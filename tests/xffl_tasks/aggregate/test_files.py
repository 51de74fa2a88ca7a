"""Hashed input and output files, and the staged output folder. Starts no process."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.files import HASH_WINDOW, InputFile, OutputFile, copy_file, sha256_file
from xffl_tasks.aggregate.staging import rename_no_replace, staged_folder

DATA = bytes(range(256)) * 1000


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    return path


def test_sha256_file_across_windows(tmp_path):
    path = tmp_path / "big.bin"
    content = os.urandom(1000) * (HASH_WINDOW // 1000 + 7)
    path.write_bytes(content)
    assert sha256_file(path) == (hashlib.sha256(content).hexdigest(), len(content))
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == (hashlib.sha256(b"").hexdigest(), 0)


def read(file: InputFile, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    file.read_into(offset, memoryview(buffer), "tensor 't'")
    return bytes(buffer)


def test_reads_in_order_are_hashed_on_the_fly(data_file):
    file = InputFile(path=data_file, header=DATA[:100], label="client 'a': data.bin")
    assert read(file, 100, 5000) == DATA[100:5100]
    assert read(file, 5100, len(DATA) - 5100) == DATA[5100:]
    assert file.sha256() == hashlib.sha256(DATA).hexdigest()
    assert file.bytes_read == len(DATA)
    file.close()


def test_reads_out_of_order_are_hashed_by_a_separate_pass(data_file):
    with ThreadPoolExecutor(1) as hasher:
        file = InputFile(
            path=data_file, header=DATA[:100], label="x", hash_inline=False, hasher=hasher
        )
        assert read(file, 5000, 10) == DATA[5000:5010]
        assert file.sha256() == hashlib.sha256(DATA).hexdigest()
        file.close()
    surprised = InputFile(path=data_file, header=DATA[:100], label="x")
    read(surprised, 200, 10)  # skips bytes 100..200: the hash needs its own pass
    assert surprised.sha256() == hashlib.sha256(DATA).hexdigest()
    surprised.close()


def test_a_file_that_shrank_is_named(data_file):
    file = InputFile(path=data_file, header=b"", label="client 'a': data.bin")
    os.truncate(data_file, 1000)
    with pytest.raises(
        AggregationError, match="client 'a': data.bin: tensor 't': the file ends at byte 1000"
    ):
        read(file, 900, 200)
    file.close()


def test_output_file_is_hashed_and_must_reach_its_size(tmp_path):
    output = OutputFile(path=tmp_path / "o.bin", header=b"head", size=10)
    output.write(memoryview(b"123456"))
    assert output.close() == hashlib.sha256(b"head123456").hexdigest()
    short = OutputFile(path=tmp_path / "short.bin", header=b"head", size=10)
    with pytest.raises(RuntimeError, match="planned"):
        short.write(memoryview(b"1234567"))
    with pytest.raises(RuntimeError, match="4 bytes written, 10 planned"):
        short.close()
    short.abandon()
    with pytest.raises(FileExistsError):
        OutputFile(path=tmp_path / "o.bin", header=b"", size=0)


def test_copy_file(data_file, tmp_path):
    assert copy_file(data_file, tmp_path / "copy") == (hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert (tmp_path / "copy").read_bytes() == DATA


def test_staged_folder_appears_only_complete(tmp_path):
    out = tmp_path / "round" / "global"
    with staged_folder(out) as stage:
        (stage / "a").write_text("1")
        assert not out.exists() and stage.parent == out.parent
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["global"]


def test_staged_folder_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "global"
    with pytest.raises(KeyError), staged_folder(out) as stage:
        (stage / "a").write_text("1")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_refuses_an_existing_output_and_one_that_appears(tmp_path):
    out = tmp_path / "global"
    out.mkdir()
    with pytest.raises(AggregationError, match="already exists"), staged_folder(out):
        pass
    out.rmdir()
    with pytest.raises(AggregationError, match="appeared while aggregating"), staged_folder(out):
        out.mkdir()  # an empty folder: plain rename(2) would replace it
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["global"]


def test_rename_no_replace(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "a", tmp_path / "b")
    rename_no_replace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_output_with_early_write_back(tmp_path):
    from xffl_tasks.aggregate import files
    from xffl_tasks.aggregate.writeback import WriteBack

    block = os.urandom(1 << 20)
    writeback = WriteBack()
    output = OutputFile(
        path=tmp_path / "o.bin", header=b"", size=3 * files.WRITEBACK_STEP, writeback=writeback
    )
    for _ in range(3 * files.WRITEBACK_STEP // len(block)):
        output.write(memoryview(block))
    writeback.drain()
    writeback.close()
    assert (
        output.close()
        == hashlib.sha256(block * (3 * files.WRITEBACK_STEP // len(block))).hexdigest()
    )
