"""Input and output files, hashed (sha256) as their bytes go by.

hashlib releases the GIL while it hashes a large buffer, so hashing on one thread overlaps
the arithmetic on another.

An ``InputFile`` is read by offset (``pread``). When the reads come in file order, as they do
for a folder laid out like the previous global model, each read also feeds the file's sha256,
so the file is read once. A file read out of order (a client sharded otherwise) is hashed by a
sequential pass of its own on another thread, from the page cache, while the aggregation runs. An ``OutputFile`` is written front to back, header
first, hashed as it goes, and fsynced on close.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import Executor, Future
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.input_hashes import COMPUTED, GIVEN, HashBook
from xffl_tasks.aggregate.writeback import WriteBack

READ_BLOCK = 8 << 20
#: Bytes hashed per memory map (a multiple of the page size).
HASH_WINDOW = 32 << 20


def sha256_file(path: Path, stop: threading.Event | None = None) -> tuple[str, int]:
    """The sha256 of a whole file and its size (``stop`` cuts it short).

    The file is hashed straight from the page cache through read-only memory maps of
    ``HASH_WINDOW`` bytes, one at a time: no copy into a buffer, and the pages are unmapped
    (not counted in this process's memory) once hashed.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        for offset in range(0, size, HASH_WINDOW):
            if stop is not None and stop.is_set():
                raise RuntimeError(f"hashing {path} was stopped")
            length = min(HASH_WINDOW, size - offset)
            with mmap.mmap(file.fileno(), length, access=mmap.ACCESS_READ, offset=offset) as window:
                digest.update(window)
    return digest.hexdigest(), size


class InputFile:
    """A file read by offset, and hashed: on the fly, or by a pass of its own on another thread.

    When the reads will follow each other in file order (``hash_inline``), each read feeds the
    hash. Otherwise ``hasher`` reads and hashes the file on its own, while the reads go on.

    :param path: the file.
    :param header: its first bytes, already read and validated (they start the hash).
    :param label: how messages name it, e.g. ``client 'site1': model.safetensors``.
    :param hasher: runs the separate pass when the file will not be read in order.
    :param stop: set to cut the separate pass short (on error).
    :param lane: if given, a single thread that feeds the reads to the hash, in order, while
        the reader goes on (``read_into`` returns the future: keep the buffer until it is done).
    :param given: hashes computed elsewhere: one whose size and mtime still match the open
        file's is taken, and the file is not hashed at all (``hash_source`` says which).
    """

    def __init__(
        self,
        *,
        path: Path,
        header: bytes,
        label: str,
        hash_inline: bool = True,
        hasher: Executor | None = None,
        stop: threading.Event | None = None,
        lane: Executor | None = None,
        given: HashBook | None = None,
    ):
        self.path = path
        self.label = label
        self._fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self._fd)
        self.size = stat.st_size
        self._known = given.lookup(path, stat) if given is not None else None
        self.hash_source = GIVEN if self._known else COMPUTED
        self._digest = hashlib.sha256(header)
        self._hashed_to = len(header)
        self._in_order = hash_inline and not self._known
        self._lane = lane
        self._hashing: Future | None = None
        self.bytes_read = len(header)
        self._separate: Future | None = None
        if not hash_inline and not self._known and hasher is not None:
            self._separate = hasher.submit(sha256_file, path, stop)

    def read_into(self, offset: int, view: memoryview, what: str) -> Future | None:
        """Fills ``view`` with the bytes at ``offset``; ``what`` names them in errors.

        Returns the hash lane's future for these bytes, if any: ``view`` must stay unchanged
        until it is done."""
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                raise AggregationError(
                    f"{self.label}: {what}: the file ends at byte {offset + done} (changed while read?)"
                )
            done += count
        self.bytes_read += done
        if self._in_order and offset == self._hashed_to:
            self._hashed_to += len(view)
            if self._lane is None:
                self._digest.update(view)
                return None
            self._hashing = self._lane.submit(self._digest.update, view)
            return self._hashing
        if len(view):
            self._in_order = False
        return None

    def sha256(self) -> str:
        """The file's sha256: given, from the reads if they covered it in order, else by a
        pass of its own."""
        if self._known:
            return self._known
        if self._hashing is not None:
            self._hashing.result()
        if self._in_order and self._hashed_to == self.size:
            return self._digest.hexdigest()
        digest, size = (
            self._separate.result() if self._separate is not None else sha256_file(self.path)
        )
        self.bytes_read += size
        return digest

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


#: Every this many bytes written, their write-back to disk is started.
WRITEBACK_STEP = 32 << 20


class OutputFile:
    """A new file written front to back, hashed as written, fsynced on close.

    :param path: where to create it (it must not exist).
    :param header: its first bytes.
    :param size: the size it must reach: closing short of it is an error.
    :param writeback: if given, starts the disk write-back every ``WRITEBACK_STEP`` bytes, so
        that the final fsync has little left to wait for. Drain it before ``close``.
    :param lane: if given, a single thread that hashes the writes, in order.
    """

    def __init__(
        self,
        *,
        path: Path,
        header: bytes,
        size: int,
        writeback: WriteBack | None = None,
        lane: Executor | None = None,
    ):
        self.path = path
        self.size = size
        self._writeback = writeback
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._digest = hashlib.sha256()
        self._lane = lane
        self._hashing: Future | None = None
        self.written = 0
        self._writeback_from = 0
        self.write(memoryview(header))

    def write(self, view: memoryview) -> Future | None:
        """Writes ``view`` at the end; returns the hash lane's future for it, if any (keep
        ``view`` unchanged until it is done)."""
        if self.written + len(view) > self.size:
            raise RuntimeError(f"{self.path}: writing past its planned size of {self.size} bytes")
        if self._lane is None:
            self._digest.update(view)
        else:
            self._hashing = self._lane.submit(self._digest.update, view)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.written += done
        if self._writeback is not None and self.written - self._writeback_from >= WRITEBACK_STEP:
            self._writeback.request(
                self._fd, self._writeback_from, self.written - self._writeback_from
            )
            self._writeback_from = self.written
        return self._hashing if self._lane is not None else None

    def close(self) -> str:
        """Fsyncs and closes; returns the sha256."""
        if self.written != self.size:
            raise RuntimeError(f"{self.path}: {self.written} bytes written, {self.size} planned")
        if self._hashing is not None:
            self._hashing.result()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return self._digest.hexdigest()

    def abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def copy_file(source: Path, target: Path) -> tuple[str, int]:
    """Copies ``source`` to a new file ``target`` (fsynced); returns its sha256 and size."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    size = 0
    with open(source, "rb", buffering=0) as reader, open(target, "xb", buffering=0) as writer:
        while count := reader.readinto(buffer):
            digest.update(view[:count])
            done = 0
            while done < count:
                done += writer.write(view[done:count])
            size += count
        os.fsync(writer.fileno())
    return digest.hexdigest(), size
