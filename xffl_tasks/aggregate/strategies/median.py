"""Coordinate-wise median (Yin et al., 2018): robust to a minority of bad clients."""

from __future__ import annotations

import torch

from xffl_tasks.aggregate.strategies.base import Strategy
from xffl_tasks.aggregate.strategies.order_statistics import sort_clients


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the median over clients (the mean of the two middle ones when even)."""
    clients = updates.shape[0]
    ordered = sort_clients(updates)
    middle = clients // 2
    if clients % 2:
        return ordered[middle].clone()
    return (ordered[middle - 1] + ordered[middle]) * 0.5


class Median(Strategy):
    """Unweighted: one facility, however many samples it claims, cannot drag the median."""

    name = "median"
    weighted = False
    scratch_per_client = 1

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return coordinate_median(updates)
