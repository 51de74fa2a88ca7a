"""Reading the next chunk of every input on a second thread while the current one is computed.

A chunk is a run of elements of one tensor. For each chunk the loader ``pread``s the bytes of
every source (the previous model, each client, each server-state file) into a slot of reused
buffers, hashing them on the way (see ``files.InputFile``), and hands the slot to the consumer,
which gives it back when done. A few slots circulate, so memory stays fixed whatever the
model's size; reading and hashing (which release the GIL) overlap the arithmetic.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch

from xffl_tasks.aggregate.files import InputFile
from xffl_tasks.aggregate.safetensors_format import DType, TensorEntry


@dataclass(frozen=True)
class Read:
    """``count`` elements of ``dtype`` at byte ``offset`` of ``file`` (None: zeros)."""

    file: InputFile | None
    offset: int
    dtype: DType
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True)
class ChunkTask:
    """Elements ``[first, first + count)`` of ``tensor``, and what to read for them, per source."""

    tensor: TensorEntry
    first: int
    count: int
    reads: tuple[Read, ...]


#: Alignment of each source's buffer within a slot's block.
ALIGN = 64


class Slot:
    """One block of memory holding a chunk's buffer for each source, one after the other."""

    def __init__(self, sizes: Sequence[int]):
        self.offsets = []
        end = 0
        for size in sizes:
            self.offsets.append(end)
            end += -(-size // ALIGN) * ALIGN
        self.block = bytearray(max(end, 1))
        view = memoryview(self.block)
        self.buffers = [view[o : o + size] for o, size in zip(self.offsets, sizes)]


class LoadedChunk:
    """A chunk's bytes, per source; valid until handed back with ``ChunkLoader.release``.

    ``hashing`` holds the futures of the hash lanes still reading the slot's buffers (inputs,
    and outputs written from the slot): the slot is reused only once they are done.
    """

    def __init__(self, task: ChunkTask, slot: Slot, index: int):
        self.task = task
        self.block = slot
        self.slot = slot.buffers
        self.index = index
        self.hashing: list[Future] = []

    def raw(self, source: int) -> memoryview:
        return memoryview(self.slot[source])[: self.task.reads[source].nbytes]

    def tensor(self, source: int) -> torch.Tensor:
        """Source ``source``'s elements as a tensor of their own dtype (no copy)."""
        read = self.task.reads[source]
        return torch.frombuffer(self.slot[source], dtype=read.dtype.torch, count=read.count)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class ChunkLoader:
    """Iterates loaded chunks of ``tasks``, read ahead on a thread of its own.

    :param tasks: the chunks, in the order they are wanted (and best, in file order).
    :param slot_bytes: per source, the largest number of bytes one chunk needs.
    :param slots: how many chunks' buffers circulate (being read, waiting, computed, written).
    """

    def __init__(self, *, tasks: Iterable[ChunkTask], slot_bytes: Sequence[int], slots: int = 3):
        self._tasks = tasks
        self._free: queue.Queue[tuple[int, Slot]] = queue.Queue()
        for index in range(slots):
            self._free.put((index, Slot(slot_bytes)))
        self._ready: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aggregate-reader", daemon=True)
        self._started = False

    def _take_slot(self) -> tuple[int, Slot] | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        try:
            for task in self._tasks:
                taken = self._take_slot()
                if taken is None:
                    return
                index, slot = taken
                chunk = LoadedChunk(task, slot, index)
                for read, buffer in zip(task.reads, slot.buffers):
                    if read.file is None:
                        torch.frombuffer(buffer, dtype=torch.uint8, count=read.nbytes).zero_()
                    else:
                        what = f"tensor {task.tensor.name!r}"
                        hashing = read.file.read_into(read.offset, buffer[: read.nbytes], what)
                        if hashing is not None:
                            chunk.hashing.append(hashing)
                self._ready.put(chunk)
            self._ready.put(_END)
        except BaseException as error:  # noqa: BLE001 (handed to the consumer, raised there)
            self._ready.put(_Failure(error))

    def __iter__(self) -> Iterator[LoadedChunk]:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def release(self, chunk: LoadedChunk) -> None:
        """Hands the chunk's slot back, once the hash lanes reading it are done."""
        wait(chunk.hashing)
        chunk.hashing.clear()
        self._free.put((chunk.index, chunk.block))

    def close(self) -> None:
        """Stops the reader (if still running) and waits for it."""
        self._stop.set()
        if self._started:
            self._thread.join()
