"""An output folder that appears only complete: written aside, fsynced, then renamed into place.

The staging folder sits beside the output (same file system, so the rename is atomic) and is
removed on any error. The rename refuses to replace anything: an output folder that appeared
meanwhile is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> object | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return function


def rename_no_replace(source: Path, target: Path) -> None:
    """Renames ``source`` to ``target``; raises FileExistsError if ``target`` exists."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    os.rename(source, target)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def check_absent(out: Path) -> None:
    if os.path.lexists(out):
        raise AggregationError(f"output folder {out} already exists: give a new --out")


def check_output_location(out: Path, inputs: Sequence[Path]) -> None:
    """Refuses an output folder that lies inside one of the input folders."""
    resolved = out.resolve()
    for folder in inputs:
        if resolved.is_relative_to(folder.resolve()):
            raise AggregationError(f"output folder {out} lies inside the input folder {folder}")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yields an empty folder beside ``out``; renames it to ``out`` when the block succeeds."""
    check_absent(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield stage
        fsync_directory(stage)
        try:
            rename_no_replace(stage, out)
        except FileExistsError:
            raise AggregationError(
                f"output folder {out} appeared while aggregating: left as it is"
            ) from None
        fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
