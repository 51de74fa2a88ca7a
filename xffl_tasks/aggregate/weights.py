"""The clients' names and weights: given explicitly, or the ``num_samples`` of each metrics.json.

There is no silent equal weighting: with no weights given, every client needs a metrics.json
whose ``num_samples`` is a positive integer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.metrics import METRICS_FILE, read_metrics

__all__ = ["METRICS_FILE", "ClientWeight", "normalize", "read_metrics", "resolve_weights"]


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


def weight_from_metrics(folder: Path, name: str) -> ClientWeight:
    """The client's weight: ``num_samples`` of its validated metrics.json (see ``metrics``)."""
    return metrics_weight(read_metrics(folder, name))


def metrics_weight(metrics: dict) -> ClientWeight:
    """The weight of validated metrics (``metrics.parse_metrics``): their ``num_samples``."""
    return ClientWeight(
        float(metrics["num_samples"]),
        "num_samples",
        metrics["num_samples"],
        metrics.get("num_tokens"),
    )


def check_given_weights(names: Sequence[str], weights: Sequence[float]) -> list[ClientWeight]:
    """The explicitly given weights, one positive finite number per client."""
    weights = list(weights)
    if len(weights) != len(names):
        raise AggregationError(f"weights: {len(weights)} weights for {len(names)} clients")
    return [
        ClientWeight(check_weight(name, w, "weight"), "given") for name, w in zip(names, weights)
    ]


def resolve_weights(
    names: Sequence[str], folders: Sequence[Path], weights: Sequence[float] | None
) -> list[ClientWeight]:
    """The weight of each client: ``weights`` if given, else ``num_samples`` from metrics.json."""
    if weights is not None:
        return check_given_weights(names, weights)
    return [weight_from_metrics(folder, name) for name, folder in zip(names, folders)]


def check_share(max_weight_share: float | None) -> Fraction | None:
    """``max_weight_share`` as an exact fraction (0.6 -> 3/5), or an error unless 0 < it <= 1."""
    if max_weight_share is None:
        return None
    if isinstance(max_weight_share, bool) or not isinstance(max_weight_share, numbers.Real):
        raise AggregationError(f"max_weight_share {max_weight_share!r} is not a number")
    share = float(max_weight_share)
    if not 0 < share <= 1:
        raise AggregationError(f"max_weight_share {max_weight_share!r} must be in (0, 1]")
    return Fraction(repr(share))  # the decimal the user wrote, not its binary approximation


def normalize(weights: Sequence[float], max_weight_share: float | None = None) -> list[float]:
    """Weights scaled to sum to one, computed exactly (fractions), each rounded once at the end.

    With ``max_weight_share``, no client gets more than that share: a client above it is set
    to it and the rest is shared among the others in proportion to their weights, until no
    one is above (water-filling). Infeasible when ``share * len(weights) < 1``.
    """
    exact = [Fraction(w) for w in weights]  # floats and ints convert exactly
    if not exact or any(w <= 0 for w in exact):
        raise AggregationError("weights: need at least one, all positive")
    cap = check_share(max_weight_share)
    if cap is not None and cap * len(exact) < 1:
        raise AggregationError(
            f"max_weight_share {max_weight_share} is infeasible for {len(exact)} clients "
            f"(it must be at least 1/{len(exact)})"
        )
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(exact)) if i not in capped]
        left = 1 - (cap * len(capped) if cap is not None else 0)
        free_total = sum(exact[i] for i in free)
        shares = [cap if i in capped else exact[i] * left / free_total for i in range(len(exact))]
        over = {i for i in free if cap is not None and shares[i] > cap}
        if not over:
            return [float(share) for share in shares]
        capped |= over
