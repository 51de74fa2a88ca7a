"""The local side of a transfer: the files of a model folder, and hashing them (in worker threads).

``hashlib`` and ``os.pread`` release the GIL on large buffers, so these functions run in threads
beside the event loop that drives the SSH connection.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from xffl_airflow.transfer.facility import check_relative_name, is_part_name


@dataclass(frozen=True)
class LocalFile:
    """A regular file of a local model folder (symlinks to files are followed)."""

    relative: str
    path: Path
    size: int
    mtime_ns: int


def scan_folder(folder: Path) -> list[LocalFile]:
    """Every file below ``folder``, sorted by relative path; our temporary names are left out.

    Raises ValueError naming the folder or file that cannot be sent (missing folder, a name
    that cannot travel, something that is not a regular file).
    """
    if not folder.is_dir():
        raise ValueError(f"local folder {folder} does not exist or is not a folder")
    files = []
    seen = {os.path.realpath(folder)}
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        # symlinked folders are followed (model caches use them), but each real folder once
        dirnames.sort()
        for name in dirnames:
            real = os.path.realpath(os.path.join(current, name))
            if real in seen:
                raise ValueError(
                    f"local folder {os.path.join(current, name)} is reached twice (a symlink loop?)"
                )
            seen.add(real)
        for name in filenames:
            if is_part_name(name):
                continue
            path = Path(current) / name
            relative = path.relative_to(folder).as_posix()
            check_relative_name(relative)
            try:
                info = path.stat()
            except FileNotFoundError:
                raise ValueError(f"local file {path} vanished or is a broken symlink") from None
            if not path.is_file():
                raise ValueError(f"local file {path} is not a regular file")
            files.append(LocalFile(relative, path, info.st_size, info.st_mtime_ns))
    if not files:
        raise ValueError(f"local folder {folder} holds no files")
    return sorted(files, key=lambda f: f.relative)


def sha256_file(path: Path, chunk_size: int) -> str:
    """The sha256 of a whole local file."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk_size):
            digest.update(data)
    return digest.hexdigest()


def segment_states(
    path: Path, length: int, segment: int, chunk_size: int
) -> tuple[list[str], list]:
    """Digests of each ``segment`` bytes of the first ``length`` bytes of ``path``, and the
    running whole-file sha256 state at each segment boundary (``states[k]`` has seen k segments).

    Fewer segments come back when the file is shorter than ``length``.
    """
    digests: list[str] = []
    whole = hashlib.sha256()
    states = [whole.copy()]
    with open(path, "rb", buffering=0) as f:
        position = 0
        while position < length:
            part = hashlib.sha256()
            end = min(position + segment, length)
            while position < end:
                data = f.read(min(chunk_size, end - position))
                if not data:
                    return digests, states
                part.update(data)
                whole.update(data)
                position += len(data)
            digests.append(part.hexdigest())
            states.append(whole.copy())
    return digests, states


def read_and_hash(fd: int, offset: int, size: int, digest) -> bytes:
    """Reads ``size`` bytes at ``offset`` and feeds them to ``digest``; short when the file is."""
    data = os.pread(fd, size, offset)
    digest.update(data)
    return data


def write_and_hash(fd: int, offset: int, blocks: list[bytes], digest) -> int:
    """Writes ``blocks`` one after the other from ``offset`` and feeds them to ``digest``."""
    for block in blocks:
        view = memoryview(block)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        digest.update(block)
    return offset
