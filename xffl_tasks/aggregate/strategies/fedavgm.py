"""FedAvgM (Hsu et al., 2019): server momentum on the clients' mean update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xffl_tasks.aggregate.strategies.base import Strategy
from xffl_tasks.aggregate.strategies.fedavg import weighted_mean
from xffl_tasks.aggregate.strategy_options import OPTION_SPECS


def momentum_step(
    update: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    server_learning_rate: float,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``buffer = momentum * buffer + update``; the change is ``server_learning_rate * buffer``.

    ``update`` is the clients' weighted mean of (client - previous), the negated
    pseudo-gradient. With ``momentum = 0`` and ``server_learning_rate = 1`` this is FedAvg.
    """
    buffer = torch.add(update, momentum_buffer, alpha=momentum)
    return buffer * server_learning_rate, buffer


class FedAvgM(Strategy):
    name = "fedavgm"
    option_specs = OPTION_SPECS["fedavgm"]
    state_names = ("momentum",)

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)

    def step(
        self, combined: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        (buffer,) = state
        change, buffer = momentum_step(combined, buffer, **self.options)
        return change, (buffer,)
