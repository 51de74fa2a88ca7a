"""Publishing a release: ``<releases_root>/<federation>/<n>/``, complete or not at all.

A release folder holds::

    model/          the model (LoRA: the base with the adapter merged, by xffl_tasks.merge)
    adapter/        LoRA only: the adapter as the campaign produced it
    README.md       the model card (xffl_tasks.release.card)
    release.json    what the release is and what it links to (schema in docs/release.md)

It is written into a hidden staging folder beside the numbered ones, its files made read-only,
and renamed to ``n`` (1 + the highest number there): a rename onto an existing, non-empty
folder fails, so two publishers never get the same ``n`` (the loser links its release.json to
the winner's release and tries the next number). Nothing is ever overwritten. The model's
files are copied from the campaign's global model of the chosen round and must be exactly the
files and sha256 that round's manifest records as its ``outputs``; the chain and the choice
are checked first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from xffl_tasks.manifest import CHUNK, hash_tree, sha256_file, verify_campaign
from xffl_tasks.release.best import Selection, check_selection
from xffl_tasks.release.chain import read_campaign
from xffl_tasks.release.errors import ReleaseError

RELEASE_FILE = "release.json"
FORMAT = "xffl-release"
VERSION = 1
MODEL_DIR, ADAPTER_DIR, CARD = "model", "adapter", "README.md"
FEDERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NUMBER = re.compile(r"^[1-9][0-9]{0,8}$")
#: Numbers tried when other publishers keep winning the race.
MAX_TRIES = 64


def release_numbers(federation_dir: str | Path) -> list[int]:
    """The numbers of the release folders there, ascending (hidden staging folders are not)."""
    folder = Path(federation_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if NUMBER.fullmatch(p.name) and p.is_dir())


def files_below(folder: Path) -> dict[str, Path]:
    """Every file below ``folder`` (file links followed, folder links not), by POSIX path."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def global_outputs(manifest: Mapping[str, Any], *, where: str, subfolder: str | None = None) -> dict[str, str]:
    """The round's global model files and sha256, from its manifest's ``outputs`` (``global/X``;
    with ``subfolder``, those of ``global/<subfolder>/X``: a lora-stacked round's ``base``)."""
    outputs = manifest.get("outputs")
    found = {}
    prefix = ("global",) + ((subfolder,) if subfolder else ())
    if isinstance(outputs, Mapping):
        for relative, digest in outputs.items():
            parts = PurePosixPath(relative).parts
            if (
                len(parts) > len(prefix)
                and parts[: len(prefix)] == prefix
                and ".." not in parts
                and isinstance(digest, str)
            ):
                found[PurePosixPath(*parts[len(prefix):]).as_posix()] = digest
    if not found:
        raise ReleaseError(f"{where}: records no global model files in its outputs")
    return found


def _copy(source: Path, target: Path) -> str:
    """Copies ``source`` to ``target`` (flushed to disk); the sha256 of the bytes written."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _copy_model(
    source: Path, target: Path, expected: Mapping[str, str], *, where: str
) -> dict[str, str]:
    """The model's files copied, each checked against the manifest's sha256."""
    if not source.is_dir():
        raise ReleaseError(f"{source}: no such model folder")
    present = files_below(source)
    extra = sorted(set(present) - set(expected))
    missing = sorted(set(expected) - set(present))
    if extra or missing:
        what = f"{extra[0]} is not among" if extra else f"{missing[0]} is missing but listed in"
        raise ReleaseError(f"{source}: {what} the global model files {where} records")
    copied = {}
    for relative in sorted(expected):
        digest = _copy(present[relative], target / relative)
        if digest != expected[relative]:
            raise ReleaseError(
                f"{present[relative]}: sha256 {digest} is not the {expected[relative]} {where} records"
            )
        copied[relative] = digest
    return copied


def _base_hashes(base: Path, recorded: object, *, where: str) -> dict[str, str]:
    if not base.is_dir():
        raise ReleaseError(f"{base}: no such base model folder")
    hashes = {relative: sha256_file(path) for relative, path in files_below(base).items()}
    if isinstance(recorded, Mapping) and recorded:
        for relative, digest in sorted(recorded.items()):
            if hashes.get(relative) != digest:
                raise ReleaseError(
                    f"{base}: {relative} is not the base model file {where} records (sha256 {digest})"
                )
    return hashes


def _read_only(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)


def _writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)


def _write(path: Path, data: bytes) -> str:
    path.unlink(missing_ok=True)
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    path.chmod(0o444)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(
    staging: Path, source: Path, base: Path | None, manifest: Mapping[str, Any], *, where: str,
    subfolder: str | None = None,
) -> tuple[dict[str, str], dict[str, str] | None]:
    """The model (LoRA: the adapter, then the merge) copied into ``staging``: the files'
    sha256 by their path in the release, and the base model's (LoRA)."""
    folder = MODEL_DIR if base is None else ADAPTER_DIR
    expected = global_outputs(manifest, where=where, subfolder=subfolder)
    copied = _copy_model(source, staging / folder, expected, where=where)
    files = {f"{folder}/{name}": digest for name, digest in copied.items()}
    if base is None:
        return files, None
    from xffl_tasks.merge import MergeError, merge

    recorded = (manifest.get("inputs") or {}).get("base_model_files")
    base_files = _base_hashes(base, recorded, where=where)
    try:
        merge(base, staging / ADAPTER_DIR, staging / MODEL_DIR)
    except MergeError as error:
        raise ReleaseError(f"merging the adapter into the base: {error}") from None
    files.update({f"{MODEL_DIR}/{k}": v for k, v in hash_tree(staging / MODEL_DIR).items()})
    return files, base_files


def _claim(staging: Path, federation_dir: Path, body: Mapping[str, Any]) -> Path:
    """Renames ``staging`` to the next number, its release.json linked to the release before;
    a publisher that got there first makes it relink and try the next number."""
    for _ in range(MAX_TRIES):
        numbers = release_numbers(federation_dir)
        number, previous = (numbers[-1] + 1 if numbers else 1), None
        if numbers:
            link = federation_dir / str(numbers[-1]) / RELEASE_FILE
            if not link.is_file():
                raise ReleaseError(f"{link.parent}: a release folder without {RELEASE_FILE}")
            previous = {"number": numbers[-1], "release_json_sha256": sha256_file(link)}
        published = datetime.now(UTC).isoformat(timespec="seconds")
        data = {**body, "number": number, "previous_release": previous, "published_at": published}
        _write(staging / RELEASE_FILE, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        target = federation_dir / str(number)
        try:
            os.rename(staging, target)  # fails onto an existing, non-empty folder
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # another publisher took this number first
            raise
        target.chmod(0o555)
        _fsync_dir(federation_dir)
        return target
    raise ReleaseError(f"{federation_dir}: no release number could be claimed in {MAX_TRIES} tries")


def publish_release(
    releases_root: str | Path,
    federation: str,
    source_model_dir: str | Path,
    *,
    campaign_dir: str | Path,
    selection: Selection,
    card_text: str,
    record: Mapping[str, Any] | None = None,
    base_model_dir: str | Path | None = None,
    model_subfolder: str | None = None,
) -> Path:
    """Publishes the global model of ``selection.round`` (``source_model_dir``: that round's
    ``global/`` folder; LoRA: the adapter, merged into ``base_model_dir``) as the next release
    of ``federation``; returns its folder. ``record`` (JSON: the comparison, the approval...)
    is stored as release.json's ``record``. ``model_subfolder``: the model is that folder of the
    round's global folder (a lora-stacked round's ``base``, the merged model), checked against the
    manifest's ``global/<subfolder>/`` outputs. ReleaseError names what is wrong; nothing is left."""
    if not isinstance(federation, str) or not FEDERATION.fullmatch(federation):
        raise ReleaseError(f"federation: {federation!r} is not 1-64 of letters, digits, _ . -")
    if not isinstance(card_text, str):
        raise ReleaseError("card_text: is not a string")
    try:
        record = json.loads(json.dumps(dict(record or {}), allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ReleaseError(f"record: not JSON-safe: {error}") from None
    chain = read_campaign(campaign_dir)
    problems = verify_campaign(chain.campaign_dir, check_files=False)
    problems += check_selection(chain.manifests, selection)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ReleaseError(f"{chain.campaign_dir}: {problems[0]}{more}")
    chosen = chain.paths[selection.round]
    source = Path(source_model_dir).absolute()
    base = Path(base_model_dir).absolute() if base_model_dir is not None else None
    federation_dir = Path(releases_root) / federation
    federation_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".release-", dir=federation_dir))
    try:
        where = f"round {selection.round}'s manifest ({chosen})"
        files, base_files = _fill(
            staging, source, base, chain.manifests[selection.round], where=where, subfolder=model_subfolder
        )
        files[CARD] = _write(staging / CARD, card_text.encode("utf-8"))
        _read_only(staging)
        staging.chmod(0o755)  # release.json is still to come
        body = {
            "format": FORMAT,
            "version": VERSION,
            "federation": federation,
            "kind": "model" if base is None else "lora",
            "source": {
                "campaign": chain.campaign,
                "round": selection.round,
                "model": str(source),
                "manifest": str(chosen.absolute()),
                "manifest_sha256": sha256_file(chosen),
                "base_model": None if base is None else str(base),
                "base_model_files": base_files,
                "model_subfolder": model_subfolder,
            },
            "campaign": {
                "dir": str(chain.campaign_dir.absolute()),
                "final_round": chain.final_round,
                "final_manifest": str(chain.final_manifest.absolute()),
                "final_manifest_sha256": chain.final_sha256,
            },
            "selection": selection.to_dict(),
            "files": dict(sorted(files.items())),
            "record": record,
        }
        return _claim(staging, federation_dir, body)
    except BaseException:
        if staging.exists():
            _writable(staging)
            shutil.rmtree(staging, ignore_errors=True)
        raise
