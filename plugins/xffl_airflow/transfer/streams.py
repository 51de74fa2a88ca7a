"""Moving one file's bytes over SFTP: many requests in flight, sha256 computed while streaming.

A file is cut into blocks (at most the server's request limit) that travel as parallel SFTP
requests; the requests of all files share one window (``max_requests``), so several files and
the ranges of one large file go over the connection at once. Local reads, writes and hashing
run in worker threads, in file order, while the event loop keeps the requests flowing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from xffl_airflow.transfer.local import read_and_hash, write_and_hash
from xffl_airflow.transfer.progress import RateLimiter


class SourceChanged(Exception):
    """The file being sent got shorter (or longer) than when the transfer began."""


@dataclass
class Flow:
    """What the files of one attempt share: the request window, the rate cap, local chunking.

    :param window: ``max_requests`` slots; each SFTP request in flight holds one
    :param max_requests: the window's size
    :param limiter: the rate cap (may never wait)
    :param chunk_size: bytes per local read or write (one worker-thread call)
    :param on_sent: called with the size of each block once it has crossed the link
    """

    window: asyncio.Semaphore
    max_requests: int
    limiter: RateLimiter
    chunk_size: int
    on_sent: Callable[[int], None]


class RequestPipeline:
    """Keeps requests in flight under a shared window; the first failure stops the pipeline.

    :param window: semaphore shared by all files of the attempt (``max_requests`` slots)
    """

    def __init__(self, window: asyncio.Semaphore):
        self._window = window
        self._tasks: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    async def submit(self, request: Callable[[], Awaitable[Any]]) -> None:
        """Starts ``request()`` once a slot is free; raises the first failure seen so far."""
        await self._window.acquire()
        if self._error is not None:
            self._window.release()
            raise self._error
        task = asyncio.ensure_future(request())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._window.release()
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def drain(self) -> None:
        """Waits for every request; raises the first failure."""
        while self._tasks and self._error is None:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_EXCEPTION)
        if self._error is not None:
            raise self._error

    async def cancel(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OrderedSink:
    """Writes received blocks to a local file and hashes them, in file order, in a thread.

    Blocks arrive in any order; each contiguous run of ``chunk_size`` bytes goes to one worker
    call, chained after the previous one so the hash sees the file in order.
    """

    def __init__(self, fd: int, digest, start: int, chunk_size: int):
        self._fd = fd
        self._digest = digest
        self._next = start
        self._chunk_size = chunk_size
        self._ready: dict[int, bytes] = {}
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._writer: asyncio.Future | None = None
        self._written = start
        self._progress = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def written(self) -> int:
        return self._written

    def put(self, offset: int, data: bytes) -> None:
        self._ready[offset] = data
        while self._next in self._ready:
            block = self._ready.pop(self._next)
            self._batch.append(block)
            self._batch_bytes += len(block)
            self._next += len(block)
        if self._batch_bytes >= self._chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, start = self._batch, self._next - self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        self._writer = asyncio.ensure_future(self._write(self._writer, start, batch))

    async def _write(self, previous: asyncio.Future | None, start: int, batch: list[bytes]) -> None:
        if previous is not None:
            await previous
        try:
            loop = asyncio.get_running_loop()
            self._written = await loop.run_in_executor(
                None, write_and_hash, self._fd, start, batch, self._digest
            )
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._progress.set()

    async def wait_for_room(self, offset: int, limit: int) -> None:
        """Waits until at most ``limit`` bytes before ``offset`` are unwritten (back-pressure)."""
        while offset - self._written > limit:
            if self._error is not None:
                raise self._error
            self._progress.clear()
            await self._progress.wait()

    async def finish(self) -> None:
        """Writes what is left; raises the first write error."""
        self._flush()
        if self._writer is not None:
            await self._writer

    async def cancel(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)


async def send_file(
    fd: int,
    remotes: list[asyncssh.SFTPClientFile],
    *,
    start: int,
    size: int,
    digest,
    block: int,
    flow: Flow,
    settled: Callable[[int], None] | None = None,
    settled_step: int = 16 << 20,
) -> None:
    """Sends bytes ``start..size`` of local ``fd`` to the remote file, hashing them in order.

    ``remotes`` are handles of the same remote file on different channels; blocks take them in
    turn. ``digest`` must already have seen bytes ``0..start``. ``settled(offset)`` is told, every
    ``settled_step`` bytes or so, up to where the server has acknowledged every write. Raises
    ``SourceChanged`` when the local file ends early; SFTP errors propagate as asyncssh raised them.
    """
    loop = asyncio.get_running_loop()
    pipeline = RequestPipeline(flow.window)
    in_order: deque[list] = deque()  # [end, acknowledged] per write, in file order
    turns = itertools.count()
    reported = start

    def read(offset: int) -> asyncio.Future:
        return loop.run_in_executor(
            None, read_and_hash, fd, offset, min(flow.chunk_size, size - offset), digest
        )

    async def write(
        remote: asyncssh.SFTPClientFile, data: memoryview, offset: int, entry: list
    ) -> None:
        nonlocal reported
        await remote.write(data, offset)
        flow.on_sent(len(data))
        entry[1] = True
        end = None
        while in_order and in_order[0][1]:
            end = in_order.popleft()[0]
        if settled is not None and end is not None and end - reported >= settled_step:
            reported = end
            settled(end)

    pending = None
    try:
        position = start
        pending = read(position) if position < size else None
        while pending is not None:
            data = await pending
            if not data:
                raise SourceChanged(f"ended at {position} bytes, expected {size}")
            end = position + len(data)
            pending = read(end) if end < size else None
            view = memoryview(data)  # slices without copies; asyncssh frames them as they are
            for offset in range(0, len(data), block):
                piece = view[offset : offset + block]
                delay = flow.limiter.delay(len(piece))
                if delay:
                    await asyncio.sleep(delay)
                entry = [position + offset + len(piece), False]
                in_order.append(entry)
                remote = remotes[next(turns) % len(remotes)]
                await pipeline.submit(
                    lambda remote=remote, piece=piece, at=position + offset, entry=entry: write(
                        remote, piece, at, entry
                    )
                )
            position = end
        await pipeline.drain()
    except BaseException:
        await pipeline.cancel()
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        raise


async def receive_file(
    remotes: list[asyncssh.SFTPClientFile],
    fd: int,
    *,
    start: int,
    size: int,
    digest,
    block: int,
    flow: Flow,
) -> None:
    """Fetches bytes ``start..size`` of the remote file into local ``fd``, hashing in order.

    ``remotes`` are handles of the same remote file on different channels; blocks take them in
    turn. ``digest`` must already have seen bytes ``0..start``. Raises ``SourceChanged`` when
    the remote file ends early; SFTP errors propagate as asyncssh raised them.
    """
    pipeline = RequestPipeline(flow.window)
    turns = itertools.count()
    sink = OrderedSink(fd, digest, start, flow.chunk_size)
    buffer_limit = (
        2 * flow.chunk_size + flow.max_requests * block
    )  # what may wait in memory at most

    async def read(remote: asyncssh.SFTPClientFile, offset: int, length: int) -> None:
        data = await remote.read(length, offset)
        while len(data) < length:  # a server may return less than asked
            more = await remote.read(length - len(data), offset + len(data))
            if not more:
                raise SourceChanged(f"ended at {offset + len(data)} bytes, expected {size}")
            data += more
        flow.on_sent(length)
        sink.put(offset, data)

    try:
        for offset in range(start, size, block):
            length = min(block, size - offset)
            await sink.wait_for_room(offset, buffer_limit)
            delay = flow.limiter.delay(length)
            if delay:
                await asyncio.sleep(delay)
            remote = remotes[next(turns) % len(remotes)]
            await pipeline.submit(
                lambda remote=remote, offset=offset, length=length: read(remote, offset, length)
            )
        await pipeline.drain()
        await sink.finish()
        if size > start and os.fstat(fd).st_size != size:
            raise SourceChanged(f"local copy has {os.fstat(fd).st_size} bytes, expected {size}")
    except BaseException:
        await pipeline.cancel()
        await sink.cancel()
        raise
