"""The aggregation engine: streaming FedAvg (and server optimisers, robust rules) over safetensors.

``aggregate(previous, clients, out, ...)`` writes the next global model; ``python -m
xffl_tasks.aggregate`` is the same from the command line. See docs/aggregation.md.
"""

from __future__ import annotations

from xffl_tasks.aggregate.aggregation import aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies import STRATEGIES

__all__ = ["STRATEGIES", "AggregationError", "aggregate"]
