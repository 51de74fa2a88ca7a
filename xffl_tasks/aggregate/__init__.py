"""The aggregation engine: streaming FedAvg (and server optimisers, robust rules) over safetensors.

``aggregate(previous, clients, out, ...)`` writes the next global model; ``python -m
xffl_tasks.aggregate`` is the same from the command line. See docs/aggregation.md.

The names below load on first use, so that the torch-free parts of the package (the
strategies' option tables in ``strategy_options``) can be imported where torch is not wanted
(the DAG processor checks a federation's config with them).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "aggregate": "xffl_tasks.aggregate.aggregation",
    "AggregationError": "xffl_tasks.aggregate.errors",
    "STRATEGIES": "xffl_tasks.aggregate.strategies",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STRATEGIES", "AggregationError", "aggregate"]
