"""Hashes of the inputs computed elsewhere (by the transfer that fetched them), taken on trust
only while each file still has the size and modification time recorded with its hash.

``input_hashes`` maps a file's path to ``{"sha256": HEX, "size": BYTES, "mtime_ns": NS}``
(``os.stat``'s ``st_size`` and ``st_mtime_ns`` when the hash was taken). The aggregation uses a
given hash instead of reading the file a second time when the open file's ``fstat`` still shows
that size and time; otherwise it hashes the file as it would without one and says so (the
report's ``input_hashes.stale``). ``--input-hashes FILE`` gives the same mapping as a JSON
object; relative paths in it are taken from the file's own folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_tasks.aggregate.errors import AggregationError

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The largest --input-hashes file read (a few hundred bytes per file).
MAX_FILE_BYTES = 16 << 20

GIVEN = "given"
COMPUTED = "computed"


@dataclass(frozen=True)
class GivenHash:
    sha256: str
    size: int
    mtime_ns: int


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: str, entry: Any, where: str) -> GivenHash:
    if not isinstance(entry, Mapping):
        raise AggregationError(f"{where}: {path!r}: not an object with sha256, size, mtime_ns")
    missing = [key for key in ("sha256", "size", "mtime_ns") if key not in entry]
    if missing:
        raise AggregationError(f"{where}: {path!r}: no {missing[0]!r}")
    sha256 = entry["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise AggregationError(
            f"{where}: {path!r}: sha256 {sha256!r} is not 64 lowercase hex digits"
        )
    for key in ("size", "mtime_ns"):
        if not _whole(entry[key]):
            raise AggregationError(f"{where}: {path!r}: {key} {entry[key]!r} is not a whole number")
    return GivenHash(sha256, entry["size"], entry["mtime_ns"])


@dataclass
class HashBook:
    """The given hashes by resolved path; records which ones were used and which were stale."""

    given: dict[Path, GivenHash] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[Any, Any] | None,
        *,
        base: Path | None = None,
        where: str = "input_hashes",
    ) -> HashBook:
        """Checks ``mapping`` (path -> entry); relative paths are taken from ``base`` (or the
        working directory)."""
        book = cls()
        if mapping is None:
            return book
        if not isinstance(mapping, Mapping):
            raise AggregationError(f"{where}: not a mapping of paths to hashes")
        for path, entry in mapping.items():
            if not isinstance(path, (str, os.PathLike)) or not str(path):
                raise AggregationError(f"{where}: key {path!r} is not a path")
            resolved = ((base or Path.cwd()) / Path(path)).resolve()
            book.given[resolved] = _check_entry(str(path), entry, where)
        return book

    def lookup(self, path: Path, stat: os.stat_result) -> str | None:
        """The given sha256 of ``path`` if its ``stat`` matches what was recorded, else None
        (a mismatch is recorded in ``stale``)."""
        given = self.given.get(Path(path).resolve())
        if given is None:
            return None
        if stat.st_size != given.size or stat.st_mtime_ns != given.mtime_ns:
            self.stale.append(str(path))
            return None
        return given.sha256


def load_input_hashes(file: Path) -> HashBook:
    """Reads ``--input-hashes FILE``: a JSON object, path -> {sha256, size, mtime_ns}."""
    file = Path(file)
    where = f"--input-hashes {file}"
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise AggregationError(f"{where}: cannot read it ({error.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise AggregationError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        mapping = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AggregationError(f"{where}: not valid JSON ({error})") from None
    return HashBook.from_mapping(mapping, base=file.resolve().parent, where=where)
