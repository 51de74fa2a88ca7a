"""Coordinate-wise trimmed mean (Yin et al., 2018): drop the extremes, average the rest."""

from __future__ import annotations

import math

import torch

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies.base import Strategy
from xffl_tasks.aggregate.strategies.order_statistics import sort_clients
from xffl_tasks.aggregate.strategy_options import OPTION_SPECS


def trimmed_count(num_clients: int, trim_fraction: float) -> int:
    """How many clients are dropped at each end: ``ceil(trim_fraction * clients)``.

    (Less a hair, so that 0.3 * 10, which is 3.0000000000000004 in floating point, gives 3.)
    """
    return math.ceil(trim_fraction * num_clients - 1e-9)


def trimmed_mean(updates: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, the mean over clients once the ``trim`` lowest and highest are dropped."""
    clients = updates.shape[0]
    if trim < 0 or clients - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} of {clients} clients at each end")
    if trim == 0:
        return updates.mean(dim=0)
    return sort_clients(updates)[trim : clients - trim].mean(dim=0)


class TrimmedMean(Strategy):
    """Unweighted; with the default fraction, one bad facility out of three or more is dropped."""

    name = "trimmed-mean"
    option_specs = OPTION_SPECS["trimmed-mean"]
    weighted = False
    scratch_per_client = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trim = trimmed_count(self.num_clients, self.options["trim_fraction"])
        if self.num_clients - 2 * self.trim < 1:
            raise AggregationError(
                f"option 'trim_fraction' {self.options['trim_fraction']:g} of trimmed-mean drops {self.trim} of "
                f"{self.num_clients} clients at each end, leaving none: it needs at least {2 * self.trim + 1} clients"
            )

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(updates, self.trim)
