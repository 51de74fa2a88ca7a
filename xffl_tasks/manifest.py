"""Round manifests: a tamper-evident chain over a campaign's rounds.

Each round folder ``<storage>/<campaign>/round-NNNN/`` holds a ``manifest.json`` that records,
among everything else about the round, the sha256 of the previous round's manifest file. The
chain is checked by ``python -m xffl_tasks.verify CAMPAIGN_DIR``: changing one byte of an older
manifest breaks the link recorded in the next one. No Airflow here: the check runs anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ROUND_DIR = re.compile(r"^round-(\d{4,})$")
CHUNK = 4 * 1024 * 1024
#: The largest manifest read (a round's record of 32 facilities is well under 1 MiB).
MAX_MANIFEST_BYTES = 16 << 20


class ManifestError(ValueError):
    """A manifest that cannot be read as one: missing, too large, not JSON, not an object."""


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest at ``path``, read bounded; ``ManifestError`` says why it cannot be read.

    Every reader of manifests (the rounds, verification, the report, the campaign view) reads
    them here."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise ManifestError(error.strerror or str(error)) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ManifestError(f"not JSON ({str(error)[:200]})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"not a JSON object but {type(manifest).__name__}")
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when there is none or it cannot be read."""
    try:
        return load_manifest(path)
    except ManifestError:
        return None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: str | Path) -> dict[str, str]:
    """sha256 of every regular file below ``root``, keyed by its POSIX path relative to it."""
    root = Path(root)
    hashes = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            hashes[path.relative_to(root).as_posix()] = sha256_file(path)
    return hashes


def round_dir_name(round_number: int) -> str:
    if round_number < 0:
        raise ValueError(f"round numbers start at 0, got {round_number}")
    return f"round-{round_number:04d}"


def round_dirs(campaign_dir: str | Path) -> list[tuple[int, Path]]:
    """The campaign's round folders in round order."""
    found = []
    for path in Path(campaign_dir).iterdir():
        match = ROUND_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Writes ``data`` beside ``path``, flushed to disk, and renames it into place: readers never
    see half a file (a writer killed before the rename leaves ``.<name>.<random>``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes JSON beside ``path`` and renames it into place: readers never see half a file."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_manifest(round_dir: str | Path, manifest: dict[str, Any], previous: str | Path | None) -> Path:
    """Writes ``round_dir/manifest.json``, linking it to the ``previous`` manifest file by sha256."""
    round_dir = Path(round_dir)
    record = dict(manifest)
    record["previous_manifest"] = str(previous) if previous else None
    record["previous_manifest_sha256"] = sha256_file(previous) if previous else None
    path = round_dir / MANIFEST
    write_json_atomic(path, record)
    return path


def warm_start_lineage(campaign_dir: str | Path) -> list[tuple[str, int]]:
    """The campaigns this one was warm-started from, nearest first: ``(campaign, round)``,
    read from each round 0 manifest's ``warm_start`` record (cycles and dead links end it)."""
    lineage: list[tuple[str, int]] = []
    seen = {Path(campaign_dir).resolve()}
    current = Path(campaign_dir)
    while True:
        manifest = read_manifest(current / round_dir_name(0) / MANIFEST)
        source = manifest.get("warm_start") if manifest is not None else None
        if not isinstance(source, dict) or not source.get("manifest"):
            return lineage
        lineage.append((str(source.get("campaign")), int(source.get("round") or 0)))
        current = Path(source["manifest"]).parent.parent
        if current.resolve() in seen:
            return lineage
        seen.add(current.resolve())


def verify_campaign(
    campaign_dir: str | Path, *, check_files: bool = True, _seen: frozenset[Path] = frozenset()
) -> list[str]:
    """Checks a campaign's manifest chain; returns the problems found (empty: it verifies).

    - every round folder has a manifest that parses and names its own campaign and round;
    - round N's ``previous_manifest_sha256`` is the sha256 of round N-1's manifest file;
    - round 0 may link to the manifest of the campaign it was warm-started from: that file's
      sha256 must match, and that campaign's chain is checked in turn (its problems prefixed
      ``warm-start source <folder>:``), so the audit chain crosses campaigns;
    - with ``check_files``, every output file the manifest lists still has its recorded sha256;
    - a privacy ledger (``privacy``) holds the accountant's epsilon for its recorded parameters.
    """
    campaign_dir = Path(campaign_dir)
    if not campaign_dir.is_dir():
        return [f"{campaign_dir}: no such campaign folder"]
    rounds = round_dirs(campaign_dir)
    if not rounds:
        return [f"{campaign_dir}: no round folders"]
    problems: list[str] = []
    ledgers: list[dict[str, Any]] = []
    previous_path: Path | None = None
    expected = 0
    for number, folder in rounds:
        if number != expected:
            problems.append(f"{folder.name}: expected round {expected} next, found round {number}")
        expected = number + 1
        path = folder / MANIFEST
        if not path.is_file():
            problems.append(f"{folder.name}: no {MANIFEST}")
            previous_path = None
            continue
        try:
            manifest = load_manifest(path)
        except ManifestError as error:
            problems.append(f"{folder.name}/{MANIFEST}: unreadable: {error}")
            previous_path = path
            continue
        if manifest.get("round") != number:
            problems.append(f"{folder.name}/{MANIFEST}: records round {manifest.get('round')!r}, not {number}")
        recorded = manifest.get("previous_manifest_sha256")
        if previous_path is not None:
            actual = sha256_file(previous_path)
            if recorded != actual:
                problems.append(
                    f"{folder.name}/{MANIFEST}: previous_manifest_sha256 {recorded} does not match "
                    f"{previous_path.parent.name}/{MANIFEST} (sha256 {actual}): an earlier manifest was changed"
                )
        elif number == 0 and recorded is not None:
            linked = manifest.get("previous_manifest")
            if not linked or not Path(linked).is_file():
                problems.append(f"{folder.name}/{MANIFEST}: links to a warm-start manifest {linked!r} that is missing")
            elif sha256_file(linked) != recorded:
                problems.append(f"{folder.name}/{MANIFEST}: warm-start manifest {linked} was changed")
            else:
                source_dir = Path(linked).parent.parent
                if source_dir.resolve() in _seen | {campaign_dir.resolve()}:
                    problems.append(f"{folder.name}/{MANIFEST}: warm-start link to {source_dir} makes a cycle")
                else:
                    problems.extend(
                        f"warm-start source {source_dir.name}: {problem}"
                        for problem in verify_campaign(source_dir, check_files=check_files,
                                                       _seen=_seen | {campaign_dir.resolve()})
                    )  # fmt: skip
        if check_files:
            for relative, digest in (manifest.get("outputs") or {}).items():
                target = folder / relative
                if not target.is_file():
                    problems.append(f"{folder.name}: output {relative} is missing")
                elif sha256_file(target) != digest:
                    problems.append(f"{folder.name}: output {relative} does not match its recorded sha256")
        if manifest.get("privacy") is not None:
            ledgers.append(manifest)
        previous_path = path
    if ledgers:  # every recorded epsilon, recomputed by the accountant from its parameters
        from xffl_tasks.privacy.ledger import check_ledger

        problems.extend(check_ledger(ledgers))
    return problems
