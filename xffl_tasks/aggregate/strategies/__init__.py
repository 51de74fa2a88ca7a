"""The aggregation strategies, by name: fedavg, fedavgm, fedadam, fedyogi, trimmed-mean, median."""

from __future__ import annotations

from collections.abc import Mapping

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies.base import OptionSpec, Strategy
from xffl_tasks.aggregate.strategies.fedadam import FedAdam
from xffl_tasks.aggregate.strategies.fedavg import FedAvg
from xffl_tasks.aggregate.strategies.fedavgm import FedAvgM
from xffl_tasks.aggregate.strategies.fedyogi import FedYogi
from xffl_tasks.aggregate.strategies.median import Median
from xffl_tasks.aggregate.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, TrimmedMean, Median)
}


def make_strategy(
    name: str, *, options: Mapping[str, float] | None = None, num_clients: int
) -> Strategy:
    """The strategy called ``name`` with validated options (errors name the field)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise AggregationError(
            f"strategy {name!r} is unknown: choose one of {', '.join(STRATEGIES)}"
        )
    return cls(options=options, num_clients=num_clients)


__all__ = ["STRATEGIES", "OptionSpec", "Strategy", "make_strategy"]
