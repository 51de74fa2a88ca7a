"""Input and output files, hashed (sha256) as their bytes go by.

hashlib releases the GIL while it hashes a large buffer, so hashing on one thread overlaps
the arithmetic on another.

An ``InputFile`` is read by offset (``pread``); while the reads come in file order, which they
do when a folder is laid out like the previous global model, each read also feeds the file's
sha256, so every input is read once. Reads out of order still work: the hash is then finished
by one more sequential pass at the end. An ``OutputFile`` is written front to back, header
first, hashed as it goes, and fsynced on close.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError

READ_BLOCK = 8 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 of a whole file and its size, read in large blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
            size += count
    return digest.hexdigest(), size


class InputFile:
    """A file read by offset, hashed on the fly while reads follow each other in file order.

    :param path: the file.
    :param header: its first bytes, already read and validated (they start the hash).
    :param label: how messages name it, e.g. ``client 'site1': model.safetensors``.
    """

    def __init__(self, *, path: Path, header: bytes, label: str):
        self.path = path
        self.label = label
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._digest = hashlib.sha256(header)
        self._hashed_to = len(header)
        self._in_order = True
        self.bytes_read = len(header)

    def read_into(self, offset: int, view: memoryview, what: str) -> None:
        """Fills ``view`` with the bytes at ``offset``; ``what`` names them in errors."""
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
            self._digest.update(view)
            self._hashed_to += len(view)
        elif len(view):
            self._in_order = False

    def sha256(self) -> str:
        """The file's sha256: from the reads if they covered it in order, else by one more pass."""
        if not (self._in_order and self._hashed_to == self.size):
            digest, size = sha256_file(self.path)
            self.bytes_read += size
            return digest
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OutputFile:
    """A new file written front to back, hashed as written, fsynced on close.

    :param path: where to create it (it must not exist).
    :param header: its first bytes.
    :param size: the size it must reach: closing short of it is an error.
    """

    def __init__(self, *, path: Path, header: bytes, size: int):
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._digest = hashlib.sha256()
        self.written = 0
        self.write(memoryview(header))

    def write(self, view: memoryview) -> None:
        if self.written + len(view) > self.size:
            raise RuntimeError(f"{self.path}: writing past its planned size of {self.size} bytes")
        self._digest.update(view)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.written += done

    def close(self) -> str:
        """Fsyncs and closes; returns the sha256."""
        if self.written != self.size:
            raise RuntimeError(f"{self.path}: {self.written} bytes written, {self.size} planned")
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
