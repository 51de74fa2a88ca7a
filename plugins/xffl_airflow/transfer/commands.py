"""Remote shell commands of a transfer, built and parsed by pure functions.

Every path is quoted with ``shlex.quote`` and has passed ``RemoteFacility.resolve`` (no control
characters, no backslashes), so ``sha256sum`` prints it plainly. Only GNU coreutils are used
(``sha256sum``, ``head``, ``split``), which every Linux facility has.
"""

from __future__ import annotations

import re
import shlex

_HEX64 = re.compile(r"[0-9a-f]{64}")


def build_sha256(path: str) -> str:
    """The command that prints the sha256 of one remote file."""
    return f"sha256sum -- {shlex.quote(path)}"


def parse_sha256(output: str, path: str) -> str:
    """The hex digest from ``sha256sum -- path`` output; ValueError when it is not there."""
    lines = output.splitlines()
    if len(lines) != 1:
        raise ValueError(f"sha256sum of {path} printed {len(lines)} lines, expected 1: {output[:200]!r}")
    digest, _, name = lines[0].partition("  ")
    if not _HEX64.fullmatch(digest) or name != path:
        raise ValueError(f"unexpected sha256sum output for {path}: {lines[0][:200]!r}")
    return digest


def build_segment_hashes(path: str, length: int, segment: int) -> str:
    """The command that prints the sha256 of each ``segment`` bytes of the first ``length`` bytes.

    One line per segment, in order (the last one may be shorter): ``head`` stops at ``length``,
    ``split --filter`` hands each segment to its own ``sha256sum``.
    """
    if length < 1 or segment < 1:
        raise ValueError(f"length and segment must be positive, got {length} and {segment}")
    return f"head -c {int(length)} -- {shlex.quote(path)} | split -b {int(segment)} --filter=sha256sum"


def parse_segment_hashes(output: str, length: int, segment: int) -> list[str]:
    """The digests printed by ``build_segment_hashes``; ValueError unless there is one per segment."""
    expected = -(-length // segment)
    digests = []
    for line in output.splitlines():
        digest, _, name = line.partition("  ")
        if not _HEX64.fullmatch(digest) or name != "-":
            raise ValueError(f"unexpected segment hash line {line[:200]!r}")
        digests.append(digest)
    if len(digests) != expected:
        raise ValueError(f"got {len(digests)} segment hashes for {length} bytes, expected {expected}")
    return digests


def matching_segments(local: list[str], remote: list[str]) -> int:
    """How many leading segments have the same digest on both sides (up to the first difference)."""
    matching = 0
    for ours, theirs in zip(local, remote):
        if ours != theirs:
            break
        matching += 1
    return matching
