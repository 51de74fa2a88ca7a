"""Remote shell commands of a transfer, built and parsed by pure functions.

Every path is quoted with ``shlex.quote`` and has passed ``RemoteFacility.resolve`` (absolute,
no line breaks, control characters or backslashes: ``remote_text.check_remote_name``, checked
again here), so hashing tools print it plainly on one line. Their output is split on ``"\n"``
only (``remote_text.split_lines``). The commands use
no redirections or shell control structures; they run framed (``remote_exec``), which needs a
login shell of the sh family.

Hashing on the facility prefers ``openssl dgst -sha256`` (OpenSSL's SHA extensions: 0.4 to
0.8 GB/s on our test machine) over coreutils' ``sha256sum`` (about 0.12 GB/s there): a probe
at the start of each session says what the facility has. While a file is pushed, a small
Python script (``python3`` on the facility's PATH, when there is one) hashes it as it lands,
so verification costs no time after the last byte.
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass

from xffl_airflow.remote_text import check_remote_name, split_lines

_HEX64 = re.compile(r"[0-9a-f]{64}")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PYTHON_OK = "xffl-python3-ok"

# Prints the empty file's digest if openssl works, and a marker if python3 has hashlib.
PROBE = f"openssl dgst -sha256 -r /dev/null ; python3 -c 'import hashlib; print(\"{PYTHON_OK}\")'"


@dataclass(frozen=True)
class HashTools:
    """What the facility can hash with: ``openssl`` (fast), ``python3`` (incremental hashing)."""

    openssl: bool = False
    python3: bool = False


def parse_probe(output: str) -> HashTools:
    """The tools that answered ``PROBE`` correctly (``sha256sum`` is assumed always present)."""
    lines = split_lines(output)
    openssl = any(line.partition(" ")[0] == EMPTY_SHA256 for line in lines)
    return HashTools(openssl=openssl, python3=PYTHON_OK in lines)


def build_sha256(tools: HashTools, path: str) -> str:
    """The command that prints the sha256 of one remote file."""
    check_remote_name(path, "remote path")
    if tools.openssl:
        return f"openssl dgst -sha256 -r {shlex.quote(path)}"
    return f"sha256sum -- {shlex.quote(path)}"


def parse_sha256(output: str, path: str) -> str:
    """The hex digest from either tool's output for ``path``; ValueError when it is not there.

    ``openssl dgst -r`` prints ``HEX *PATH``, ``sha256sum`` prints ``HEX  PATH``.
    """
    lines = split_lines(output)
    if len(lines) != 1:
        raise ValueError(
            f"hashing {path!r} printed {len(lines)} lines, expected 1: {output[:200]!r}"
        )
    digest, _, name = lines[0].partition(" ")
    if not _HEX64.fullmatch(digest) or name not in (f"*{path}", f" {path}"):
        raise ValueError(f"unexpected hash output for {path!r}: {lines[0][:200]!r}")
    return digest


def build_segment_hashes(tools: HashTools, path: str, length: int, segment: int) -> str:
    """The command that prints the sha256 of each ``segment`` bytes of the first ``length`` bytes.

    One line per segment, in order (the last one may be shorter): ``head`` stops at ``length``,
    ``split --filter`` hands each segment to a hashing command of its own.
    """
    if length < 1 or segment < 1:
        raise ValueError(f"length and segment must be positive, got {length} and {segment}")
    check_remote_name(path, "remote path")
    hasher = "openssl dgst -sha256 -r" if tools.openssl else "sha256sum"
    return f"head -c {int(length)} -- {shlex.quote(path)} | split -b {int(segment)} --filter={shlex.quote(hasher)}"


def parse_segment_hashes(output: str, length: int, segment: int) -> list[str]:
    """The digests printed by ``build_segment_hashes``; ValueError unless there is one per segment."""
    expected = -(-length // segment)
    digests = []
    for line in split_lines(output):
        digest, _, name = line.partition(" ")
        if not _HEX64.fullmatch(digest) or name not in ("*stdin", " -"):
            raise ValueError(f"unexpected segment hash line {line[:200]!r}")
        digests.append(digest)
    if len(digests) != expected:
        raise ValueError(
            f"got {len(digests)} segment hashes for {length} bytes, expected {expected}"
        )
    return digests


def matching_segments(local: list[str], remote: list[str]) -> int:
    """How many leading segments have the same digest on both sides (up to the first difference)."""
    matching = 0
    for ours, theirs in zip(local, remote):
        if ours != theirs:
            break
        matching += 1
    return matching


# Hashes the file named by argv[1] as it grows: each line on stdin is an offset up to which the
# file is complete; at the end of stdin it prints the digest and how many bytes it hashed.
_GROWING_HASHER = """\
import hashlib, sys
f = open(sys.argv[1], "rb", buffering=0)
h = hashlib.sha256()
done = 0
for line in sys.stdin:
    end = int(line)
    while done < end:
        data = f.read(min(8388608, end - done))
        if not data:
            break
        h.update(data)
        done += len(data)
print(h.hexdigest(), done, flush=True)
"""


def build_growing_hash(path: str) -> str:
    """The command that hashes ``path`` while it is being written (see ``_GROWING_HASHER``).

    The script travels base64-encoded: no quotes, newlines or ``!`` for any shell to mangle.
    """
    check_remote_name(path, "remote path")
    encoded = base64.b64encode(_GROWING_HASHER.encode()).decode()
    return f"python3 -c 'import base64; exec(base64.b64decode(\"{encoded}\"))' {shlex.quote(path)}"


def parse_growing_hash(output: str, size: int, path: str) -> str:
    """The digest printed by the growing hasher; ValueError unless it hashed exactly ``size`` bytes."""
    fields = output.split()
    if len(fields) != 2 or not _HEX64.fullmatch(fields[0]) or not fields[1].isdigit():
        raise ValueError(f"unexpected output of the hasher of {path!r}: {output[:200]!r}")
    if int(fields[1]) != size:
        raise ValueError(f"the hasher of {path!r} read {fields[1]} bytes, expected {size}")
    return fields[0]
