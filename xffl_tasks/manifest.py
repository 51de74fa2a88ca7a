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


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes JSON beside ``path`` and renames it into place: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        try:
            manifest = json.loads((current / round_dir_name(0) / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return lineage
        source = manifest.get("warm_start") if isinstance(manifest, dict) else None
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
    - with ``check_files``, every output file the manifest lists still has its recorded sha256.
    """
    campaign_dir = Path(campaign_dir)
    if not campaign_dir.is_dir():
        return [f"{campaign_dir}: no such campaign folder"]
    rounds = round_dirs(campaign_dir)
    if not rounds:
        return [f"{campaign_dir}: no round folders"]
    problems: list[str] = []
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
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
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
        previous_path = path
    return problems
