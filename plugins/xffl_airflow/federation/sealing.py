"""Sealed instructions in a federation's storage: a typed plan written once, read back checked,
and records of the steps done under it. Shared by the rounds and the releases.

A plan is a frozen pydantic model with ``to_json()`` (canonical text), ``same_as(other)`` and
``from_json(text, source=...)``; sealed, it is its file and that file's sha256. A step's record
names the plan's sha256 it obeyed: a later step accepts only records of the same plan.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from xffl_airflow.federation.errors import PlanError
from xffl_tasks.manifest import read_manifest, write_bytes_atomic, write_json_atomic

#: The largest plan read back (a round's plan of 32 facilities is tens of KiB).
MAX_PLAN_BYTES = 8 << 20
P = TypeVar("P")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_sealed(cls: type[P], path: Path, *, what: str) -> tuple[P, str]:
    """The plan in ``path`` (validated by ``cls.from_json``) and the sha256 of its file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PLAN_BYTES + 1)
    except OSError as error:
        raise PlanError(f"{path}: cannot read the {what}: {error.strerror}") from None
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"{path}: larger than {MAX_PLAN_BYTES} bytes; not a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not UTF-8; not a {what}") from None
    return cls.from_json(text, source=str(path)), text_sha256(text)


def seal(value: Any, path: Path, *, what: str, log: Any) -> tuple[Any, str]:
    """Writes ``value`` to ``path`` (aside, then renamed) unless the same plan (but for when it was
    sealed) is there already, which then stands; the plan that stands and its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        try:
            existing, sha = read_sealed(type(value), path, what=what)
        except PlanError as error:
            log.warning("replacing the %s, which cannot be read: %s", what, error)
        else:
            if existing.same_as(value):
                log.info("%s: the %s sealed at %s stands (sha256 %s)", path, what, existing.sealed_at, sha)
                return existing, sha
            log.warning(
                "%s: sealing a new %s in place of the one sealed at %s (sha256 %s): steps done under the "
                "earlier one do not count for this one; clear them to run them again", path, what,
                existing.sealed_at, sha,
            )  # fmt: skip
    text = value.to_json()
    write_bytes_atomic(path, text.encode())
    sha = text_sha256(text)
    log.info("%s sealed in %s (sha256 %s)", what, path, sha)
    return value, sha


def write_record(path: Path, plan_sha256: str, fields: dict[str, Any], result: dict[str, Any]) -> Path:
    """Records a step's result under the plan it obeyed (written aside, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**fields, "plan_sha256": plan_sha256, "at": now(), "result": result})
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    """A step's record (the bounded JSON-object reader), or None when absent or unreadable."""
    record = read_manifest(path)
    if record is None or not isinstance(record.get("result"), dict):
        return None
    return record
