"""The local side: scanning a model folder, hashing, and the ordered writer (real files, no SSH)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from xffl_airflow.transfer.local import (
    read_and_hash,
    scan_folder,
    segment_states,
    sha256_file,
    write_and_hash,
)
from xffl_airflow.transfer.runner import run_all
from xffl_airflow.transfer.streams import OrderedSink, RequestPipeline


def test_scan_lists_files_follows_symlinks_and_skips_unfinished_copies(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"weights")
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (model / "model.safetensors").symlink_to(blobs / "abc")  # as in a Hugging Face cache
    (model / ".model.safetensors.xffl-part").write_bytes(b"half")
    files = scan_folder(model)
    assert [(f.relative, f.size) for f in files] == [
        ("config.json", 2), ("model.safetensors", 7), ("tokenizer/vocab.json", 8),
    ]  # fmt: skip


def test_scan_refuses_what_cannot_be_sent(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no files"):
        scan_folder(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dangling vanished or is a broken symlink"):
        scan_folder(tmp_path)
    (tmp_path / "dangling").unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="reached twice"):
        scan_folder(tmp_path)


def test_segment_states_give_the_digest_of_each_segment_and_the_running_state(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    digests, states = segment_states(path, 9_000, 4_096, chunk_size=1_000)
    assert digests == [
        hashlib.sha256(data[i : min(i + 4096, 9000)]).hexdigest() for i in (0, 4096, 8192)
    ]
    assert [s.hexdigest() for s in states] == [
        hashlib.sha256(data[:n]).hexdigest() for n in (0, 4096, 8192, 9000)
    ]
    assert sha256_file(path, 3_000) == hashlib.sha256(data).hexdigest()
    short, _ = segment_states(path, 20_000, 4_096, chunk_size=1_000)  # the file ends first
    assert len(short) == 2


def test_read_and_write_feed_the_digest(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        written = hashlib.sha256()
        assert write_and_hash(fd, 0, [b"abc", b"defg"], written) == 7
        read = hashlib.sha256()
        assert read_and_hash(fd, 2, 100, read) == b"cdefg"
    finally:
        os.close(fd)
    assert written.hexdigest() == hashlib.sha256(b"abcdefg").hexdigest()
    assert read.hexdigest() == hashlib.sha256(b"cdefg").hexdigest()


def test_the_ordered_sink_writes_and_hashes_blocks_that_arrive_out_of_order(tmp_path):
    data = os.urandom(100_000)
    blocks = [(i, data[i : i + 7_000]) for i in range(10_000, 100_000, 7_000)]
    order = blocks[1::2] + blocks[0::2]  # every other block late
    path = tmp_path / "part"
    path.write_bytes(data[:10_000])  # a verified prefix is already there

    async def receive() -> str:
        digest = hashlib.sha256(data[:10_000])
        fd = os.open(path, os.O_WRONLY)
        try:
            sink = OrderedSink(fd, digest, 10_000, chunk_size=20_000)
            for offset, block in order:
                sink.put(offset, block)
                await asyncio.sleep(0)
            await sink.finish()
            assert sink.written == 100_000
        finally:
            os.close(fd)
        return digest.hexdigest()

    assert asyncio.run(receive()) == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data


def test_the_pipeline_bounds_requests_in_flight_and_raises_the_first_failure():
    async def scenario():
        window = asyncio.Semaphore(3)
        pipeline = RequestPipeline(window)
        in_flight, most = 0, 0

        async def request(n: int) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= 1
            if n == 7:
                raise ConnectionResetError("link lost at request 7")

        with pytest.raises(ConnectionResetError, match="request 7"):
            for n in range(20):
                await pipeline.submit(lambda n=n: request(n))
            await pipeline.drain()
        await pipeline.cancel()
        return most, window.locked()

    most, locked = asyncio.run(scenario())
    assert most == 3
    assert locked is False  # every slot given back


def test_run_all_prefers_an_error_no_retry_can_fix():
    from xffl_airflow.transfer import TransferError
    from xffl_airflow.transfer.errors import RetryableFailure

    async def lost():
        raise RetryableFailure("link lost")

    async def denied():
        raise TransferError("site1", "permission denied", path="/w/m")

    async def slow():
        await asyncio.sleep(10)

    with pytest.raises(TransferError, match="permission denied"):
        asyncio.run(run_all([lost, denied, slow], limit=3))
    assert asyncio.run(run_all([], limit=2)) == []
