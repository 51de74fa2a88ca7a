"""A facility's private training data on disk: which files, and the documents in them.

A data path is one of:

- a file: ``.jsonl``/``.ndjson`` (one JSON object a line, the text in ``text_field``) or
  ``.txt`` (documents separated by blank lines);
- a folder of such files (searched recursively, hidden files skipped): files named ``val``,
  ``valid``, ``validation``, ``dev`` or ``eval`` (alone or followed by ``.``, ``_`` or ``-``:
  ``validation.jsonl``, ``val_2.txt``) are validation data, ``test`` files likewise are left
  alone, every other one is training data;
- a pre-tokenised folder (it holds ``xffl_tokens.json``, see :mod:`xffl_tasks.data.tokens`).

Every problem is a :class:`DataError` naming the file (and line).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt",)
VALIDATION_NAME = re.compile(r"^(val|valid|validation|dev|eval)([._-].*)?$", re.IGNORECASE)
TEST_NAME = re.compile(r"^test([._-].*)?$", re.IGNORECASE)
PRETOKENISED_MARKER = "xffl_tokens.json"


class DataError(ValueError):
    """The data is missing, unreadable or empty; the message names the path."""


@dataclass(frozen=True)
class DataSource:
    """The files of a data path, or the pre-tokenised folder it is."""

    path: Path
    train_files: list[Path] = field(default_factory=list)
    validation_files: list[Path] = field(default_factory=list)
    pretokenised: Path | None = None


def _supported(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES + TEXT_SUFFIXES


def discover(data: str | Path, *, val_file: str | Path | None = None) -> DataSource:
    """Finds the training and validation files of a data path."""
    data = Path(data)
    validation = [Path(val_file)] if val_file else []
    for extra in validation:
        if not extra.is_file():
            raise DataError(f"{extra}: no such validation file (val_file)")
        if not _supported(extra):
            raise DataError(f"{extra}: a validation file must be .jsonl, .ndjson or .txt")
    if not data.exists():
        raise DataError(f"{data}: no such data file or folder")
    if data.is_file():
        if not _supported(data):
            raise DataError(
                f"{data}: unsupported data file; use .jsonl, .ndjson or .txt, or a folder of them"
            )
        return DataSource(data, [data], validation)
    if not data.is_dir():
        raise DataError(f"{data}: not a regular file or folder")
    if (data / PRETOKENISED_MARKER).is_file():
        return DataSource(data, [], validation, pretokenised=data)
    try:
        candidates = sorted(
            p for p in data.rglob("*")
            if _supported(p) and p.is_file() and not any(part.startswith(".") for part in p.relative_to(data).parts)
        )  # fmt: skip
    except OSError as error:
        raise DataError(f"{data}: cannot list the data folder: {error.strerror}") from None
    train, found_validation = [], []
    for path in candidates:
        stem = path.name.split(".")[0]
        if TEST_NAME.match(stem):
            continue
        (found_validation if VALIDATION_NAME.match(stem) else train).append(path)
    if not train:
        raise DataError(
            f"{data}: no training files (.jsonl, .ndjson or .txt, not named val*/test*)"
        )
    return DataSource(data, train, validation or found_validation)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise DataError(f"{path}: cannot read the data file: permission denied") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {error.start})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file: {error.strerror or error}") from None


def read_documents(path: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of one file, in order."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = paragraph.strip()
            if paragraph:
                yield paragraph
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with a {text_field!r} field")
        if text_field not in record:
            raise DataError(
                f"{path}:{number}: no {text_field!r} field (set text_field to the field that holds the text)"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: the {text_field!r} field is not a string")
        if value.strip():
            yield value


def read_all(paths: list[Path], *, text_field: str, what: str) -> list[str]:
    """Every document of ``paths``; an error when there is none."""
    documents: list[str] = []
    for path in paths:
        documents.extend(read_documents(path, text_field=text_field))
    if not documents:
        names = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise DataError(
            f"{names}: no {what} text (the file{'s are' if len(paths) > 1 else ' is'} empty)"
        )
    return documents
