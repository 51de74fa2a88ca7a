"""What an attempt of a round's step leaves behind when it is killed mid-write, and removing it.

One attempt of a round's task runs at a time, so whatever an earlier attempt left half-written
is not being written by anyone when the next attempt starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def killed_writes(folder: Path, names: list[str]) -> list[Path]:
    """The temporary files that atomic writes of ``names`` in ``folder`` leave when their writer
    is killed before the rename (``tempfile.mkstemp(prefix="." + name + ".")``)."""
    return [stale for name in names for stale in Path(folder).glob(f".{name}.*")]


def remove_leftovers(paths: list[Path]) -> None:
    """Removes what an earlier attempt, killed mid-write, left behind (files or folders)."""
    for stale in paths:
        log.warning("removing %s, left by an earlier attempt that was killed", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
