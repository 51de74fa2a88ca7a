"""``evaluation.json``: what a facility's final evaluation writes, and its bounded reader.

The file (``python -m xffl_tasks.evaluate`` writes it; format ``xffl-evaluation``, version 1)::

    {"format": "xffl-evaluation", "version": 1,
     "candidates": {"last": {"val_loss": 2.31, "val_tokens": 8064, "val_sequences": 128,
                             "model": "/path/global", "adapter": null, "seconds": 4.2}, ...},
     "seq_len": 64, "seed": 0, "batch_size": 8, "val_max_sequences": null, "val_split": 0.1,
     "val_file": null, "text_field": "text", "base": null, "data": {...}, "world_size": 1,
     "launcher": "single", "device": "cpu", "precision": "fp32", "parallelism": "none",
     "threads": 4, "versions": {...}, "started_at": "...", "finished_at": "...", "seconds": 9.1}

On the aggregation side the file is a facility's output, so untrusted: :func:`parse_evaluation`
reads it with the aggregation's bounded JSON reader (size, nesting, integer digits, strict
UTF-8, no duplicate keys) and checks the fields it returns: at most ``MAX_CANDIDATES``
candidates named like ``last`` (``NAME``), each with a finite ``val_loss`` within
+-``MAX_LOSS`` and whole ``val_tokens``/``val_sequences`` of at least 1; ``seq_len`` and
``seed`` whole numbers. Errors name the facility and the field. No torch here: the Airflow
side may import it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xffl_tasks.aggregate.bounded_json import JSONError, load_json

EVALUATION_FILE = "evaluation.json"
FORMAT = "xffl-evaluation"
VERSION = 1
MAX_EVALUATION_BYTES = 64 << 10
MAX_DEPTH = 4
MAX_CANDIDATES = 16
#: A loss beyond this is no loss a model reports (the same bound as metrics.json's).
MAX_LOSS = 1e6
MAX_COUNT = 10**18
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EvaluationFileError(ValueError):
    """A facility's evaluation.json breaks a limit or the schema; names the facility and field."""

    def __init__(self, facility: str, field: str | None, problem: str):
        self.facility, self.field = facility, field
        where = f"{EVALUATION_FILE} {field}" if field else EVALUATION_FILE
        super().__init__(f"facility {facility!r}: {where} {problem}")


@dataclass(frozen=True)
class CandidateEvaluation:
    """One candidate's loss at one facility: the token-weighted mean cross-entropy."""

    name: str
    val_loss: float
    val_tokens: int
    val_sequences: int


@dataclass(frozen=True)
class FacilityEvaluation:
    """A facility's checked evaluation.json: its candidates by name, ``seq_len`` and ``seed``."""

    facility: str
    candidates: Mapping[str, CandidateEvaluation]
    seq_len: int
    seed: int


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _whole(facility: str, field: str, value: object, low: int, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EvaluationFileError(
            facility, field, f"{_shown(value)} is not a whole number from {low} to {high}"
        )
    return value


def _loss(facility: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvaluationFileError(facility, field, f"{_shown(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or not -MAX_LOSS <= number <= MAX_LOSS:
        raise EvaluationFileError(
            facility,
            field,
            f"{_shown(value)} is not a finite number from {-MAX_LOSS:g} to {MAX_LOSS:g}",
        )
    return number


def parse_evaluation(
    data: bytes, facility: str, *, expected: tuple[str, ...] = ()
) -> FacilityEvaluation:
    """The checked evaluation in ``data`` (an evaluation.json's bytes); every name of
    ``expected`` must be among the candidates. Raises :class:`EvaluationFileError`."""
    try:
        value = load_json(data, max_bytes=MAX_EVALUATION_BYTES, max_depth=MAX_DEPTH)
    except JSONError as error:
        raise EvaluationFileError(facility, None, str(error)) from None
    if not isinstance(value, dict):
        raise EvaluationFileError(facility, None, "is not a JSON object")
    if value.get("format") != FORMAT or value.get("version") != VERSION:
        raise EvaluationFileError(
            facility, "format", f"is not {FORMAT!r} version {VERSION} (found "
            f"{_shown(value.get('format'))} version {_shown(value.get('version'))})",
        )  # fmt: skip
    candidates = value.get("candidates")
    if not isinstance(candidates, dict) or not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise EvaluationFileError(
            facility, "candidates", f"is not a map of 1 to {MAX_CANDIDATES} candidates"
        )
    checked: dict[str, CandidateEvaluation] = {}
    for name, entry in candidates.items():
        if not NAME.fullmatch(name):
            raise EvaluationFileError(
                facility, "candidates", f"{_shown(name)} is not a candidate name"
            )
        where = f"candidates.{name}"
        if not isinstance(entry, dict):
            raise EvaluationFileError(facility, where, "is not an object")
        checked[name] = CandidateEvaluation(
            name=name,
            val_loss=_loss(facility, f"{where}.val_loss", entry.get("val_loss")),
            val_tokens=_whole(facility, f"{where}.val_tokens", entry.get("val_tokens"), 1),
            val_sequences=_whole(facility, f"{where}.val_sequences", entry.get("val_sequences"), 1),
        )
    for name in expected:
        if name not in checked:
            raise EvaluationFileError(
                facility, f"candidates.{name}", f"is missing (found {', '.join(sorted(checked))})"
            )
    return FacilityEvaluation(
        facility=facility,
        candidates=checked,
        seq_len=_whole(facility, "seq_len", value.get("seq_len"), 2),
        seed=_whole(facility, "seed", value.get("seed"), 0),
    )


def read_evaluation(
    path: str | Path, facility: str, *, expected: tuple[str, ...] = ()
) -> FacilityEvaluation:
    """The facility's checked evaluation.json (``path`` is the file or the folder holding it);
    at most ``MAX_EVALUATION_BYTES + 1`` bytes are read."""
    path = Path(path)
    if path.is_dir():
        path = path / EVALUATION_FILE
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_EVALUATION_BYTES + 1)
    except OSError as error:
        raise EvaluationFileError(
            facility, None, f"cannot be read at {path}: {error.strerror or error}"
        ) from None
    return parse_evaluation(data, facility, expected=expected)


def losses_of(evaluations: Mapping[str, FacilityEvaluation], candidate: str) -> dict[str, float]:
    """Each facility's loss of ``candidate`` (facilities that did not evaluate it left out)."""
    return {
        name: evaluation.candidates[candidate].val_loss
        for name, evaluation in sorted(evaluations.items())
        if candidate in evaluation.candidates
    }
