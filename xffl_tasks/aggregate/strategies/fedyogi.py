"""FedYogi (Reddi et al., 2021): FedAdam with Yogi's additive second-moment update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xffl_tasks.aggregate.strategies.base import Strategy
from xffl_tasks.aggregate.strategies.fedadam import ADAPTIVE_OPTIONS, adaptive_change
from xffl_tasks.aggregate.strategies.fedavg import weighted_mean


def yogi_step(
    update: torch.Tensor,
    first_moment: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    server_learning_rate: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FedYogi step: ``v = v - (1-b2) d^2 sign(v - d^2)``; returns the change, m, v."""
    first = torch.lerp(first_moment, update, 1.0 - beta1)
    squared = update * update
    second = second_moment - (1.0 - beta2) * squared * torch.sign(second_moment - squared)
    change = adaptive_change(first, second, server_learning_rate=server_learning_rate, tau=tau)
    return change, first, second


class FedYogi(Strategy):
    name = "fedyogi"
    option_specs = ADAPTIVE_OPTIONS
    state_names = ("first_moment", "second_moment")

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)

    def step(
        self, combined: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        change, first, second = yogi_step(combined, *state, **self.options)
        return change, (first, second)
