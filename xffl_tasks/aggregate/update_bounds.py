"""Declared bounds against weight and update capture: pure functions on names and numbers.

Two bounds, both optional, both for every strategy (adapters included):

- ``max_samples``: per client, the most ``num_samples`` its metrics.json may claim (what the
  facility declared it holds). A client claiming more is left out, its reason naming the
  facility, the claim and the bound: one facility claiming 10**12 samples cannot take the
  whole weight.
- ``norm_bound`` (a multiplier ``k``) with an action, ``clip`` or ``refuse``: a client whose
  update norm is above ``k`` times the median client norm is scaled down to that limit
  (``clip``: its update ``client - previous`` is multiplied by ``limit / norm``) or left out
  (``refuse``). The median is the lower median (``statistics.median_low``) of the norms of the
  clients that passed the file checks, so that with two clients the smaller norm sets the
  limit; it is decided once, before the aggregation pass. A median of zero makes the limit
  zero: every client that moved at all is clipped to no update (or refused).
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from xffl_tasks.aggregate.errors import AggregationError

NORM_BOUND_ACTIONS = ("clip", "refuse")
#: The largest multiplier accepted (beyond it the bound bounds nothing).
MAX_MULTIPLIER = 1e6


@dataclass(frozen=True)
class NormBound:
    """Clip (or refuse) clients whose update norm is above ``multiplier`` x the median norm."""

    multiplier: float
    action: str = "clip"


def check_norm_bound(multiplier: float | None, action: str = "clip") -> NormBound | None:
    """The bound (None when ``multiplier`` is None): ``1 <= multiplier <= MAX_MULTIPLIER``."""
    if action not in NORM_BOUND_ACTIONS:
        raise AggregationError(
            f"norm_bound_action {action!r} is not one of {', '.join(NORM_BOUND_ACTIONS)}"
        )
    if multiplier is None:
        return None
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real):
        raise AggregationError(f"norm_bound {multiplier!r} is not a number")
    value = float(multiplier)
    if not (math.isfinite(value) and 1.0 <= value <= MAX_MULTIPLIER):
        raise AggregationError(
            f"norm_bound {multiplier!r} must be from 1 to {MAX_MULTIPLIER:g} "
            "(a multiple of the median client update norm)"
        )
    return NormBound(value, action)


def check_max_samples(max_samples: Sequence[int | None] | None, count: int) -> list[int | None]:
    """One bound per client (None: unbounded), each a whole number from 1 up."""
    if max_samples is None:
        return [None] * count
    bounds = list(max_samples)
    if len(bounds) != count:
        raise AggregationError(f"max_samples: {len(bounds)} bounds for {count} clients")
    for bound in bounds:
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound < 1
        ):
            raise AggregationError(f"max_samples: {bound!r} is not a whole number from 1 up")
    return bounds


def check_num_samples(name: str, num_samples: int, bound: int | None) -> None:
    """Raises, naming the facility, the claim and the bound, if ``num_samples`` exceeds it."""
    if bound is not None and num_samples > bound:
        raise AggregationError(
            f"client {name!r}: metrics.json num_samples {num_samples} exceeds the facility's "
            f"declared bound of {bound} samples (max_samples)"
        )


@dataclass(frozen=True)
class BoundOutcome:
    """What the norm bound did: the median and limit, the clients clipped (with their scale)
    and refused (with the reason), every client's norm before."""

    bound: NormBound
    median: float
    limit: float
    norms: Mapping[str, float]
    scales: Mapping[str, float] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def report(self) -> dict:
        """The report's ``norm_bound`` section."""
        return {
            "multiplier": self.bound.multiplier,
            "action": self.bound.action,
            "median_norm": self.median,
            "limit": self.limit,
            "norms": dict(self.norms),
            "clipped": {
                name: {"norm": self.norms[name], "scale": scale}
                for name, scale in self.scales.items()
            },
            "refused": {name: self.norms[name] for name in self.refused},
        }


def apply_norm_bound(norms: Mapping[str, float], bound: NormBound) -> BoundOutcome:
    """Which clients (``norms``: name -> finite update norm) are clipped or refused.

    >>> outcome = apply_norm_bound({"a": 1.0, "b": 2.0, "c": 100.0}, NormBound(2.0))
    >>> outcome.limit, dict(outcome.scales)
    (4.0, {'c': 0.04})
    """
    if not norms:
        raise AggregationError("norm_bound: no client norms to bound")
    median = statistics.median_low(norms.values())
    limit = bound.multiplier * median
    scales: dict[str, float] = {}
    refused: dict[str, str] = {}
    for name, norm in norms.items():
        if norm <= limit:
            continue
        if bound.action == "refuse":
            refused[name] = (
                f"client {name!r}: update norm {norm:.6g} is above {bound.multiplier:g} x the "
                f"median client update norm {median:.6g} (limit {limit:.6g}; norm_bound refuse)"
            )
        else:
            scales[name] = limit / norm
    return BoundOutcome(bound, median, limit, dict(norms), scales, refused)
