"""The clients' names and weights: given explicitly, or the ``num_samples`` of each metrics.json.

There is no silent equal weighting: with no weights given, every client needs a metrics.json
whose ``num_samples`` is a positive integer.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class ClientWeight:
    """A client's weight, where it came from (``num_samples`` or ``given``), and its metrics."""

    weight: float
    source: str
    num_samples: int | None = None
    num_tokens: int | None = None


def resolve_names(folders: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """The clients' names: as given, else their folder names; they must be distinct."""
    if names is None:
        names = [Path(folder).name for folder in folders]
    else:
        names = list(names)
        if len(names) != len(folders):
            raise AggregationError(f"names: {len(names)} names for {len(folders)} client folders")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise AggregationError(f"names: {name!r} is not a client name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AggregationError(
            f"names: client name {duplicates[0]!r} is used twice (give distinct names)"
        )
    return names


def check_weight(name: str, value: object, field: str) -> float:
    """A weight as a float, or an error naming the client unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AggregationError(f"client {name!r}: {field} {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise AggregationError(
            f"client {name!r}: {field} {value!r} must be a positive finite number"
        )
    return number


def read_metrics(folder: Path, name: str) -> dict:
    """The client's metrics.json, as a JSON object."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise AggregationError(
            f"client {name!r}: no {METRICS_FILE} in {folder} (its num_samples is the default weight); "
            "give the weights explicitly (--weights) or add it"
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AggregationError(
            f"client {name!r}: {METRICS_FILE} is not valid JSON ({error})"
        ) from None
    if not isinstance(metrics, dict):
        raise AggregationError(f"client {name!r}: {METRICS_FILE} is not a JSON object")
    return metrics


def _count(metrics: dict, field: str) -> int | None:
    value = metrics.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def resolve_weights(
    names: Sequence[str], folders: Sequence[Path], weights: Sequence[float] | None
) -> list[ClientWeight]:
    """The weight of each client: ``weights`` if given, else ``num_samples`` from metrics.json."""
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(names):
            raise AggregationError(f"weights: {len(weights)} weights for {len(names)} clients")
        return [
            ClientWeight(check_weight(name, w, "weight"), "given")
            for name, w in zip(names, weights)
        ]
    resolved = []
    for name, folder in zip(names, folders):
        metrics = read_metrics(folder, name)
        if "num_samples" not in metrics:
            raise AggregationError(
                f"client {name!r}: {METRICS_FILE} has no num_samples (the default weight)"
            )
        samples = metrics["num_samples"]
        if _count(metrics, "num_samples") is None:
            raise AggregationError(
                f"client {name!r}: {METRICS_FILE} num_samples {samples!r} is not an integer"
            )
        weight = check_weight(name, samples, f"{METRICS_FILE} num_samples")
        resolved.append(ClientWeight(weight, "num_samples", samples, _count(metrics, "num_tokens")))
    return resolved


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one."""
    total = math.fsum(weights)
    return [w / total for w in weights]
