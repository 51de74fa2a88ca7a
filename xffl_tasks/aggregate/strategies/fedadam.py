"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): Adam on the server."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xffl_tasks.aggregate.strategies.base import Strategy
from xffl_tasks.aggregate.strategies.fedavg import weighted_mean
from xffl_tasks.aggregate.strategy_options import OPTION_SPECS

ADAPTIVE_OPTIONS = OPTION_SPECS["fedadam"]


def adaptive_change(
    first_moment: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    server_learning_rate: float,
    tau: float,
) -> torch.Tensor:
    """``server_learning_rate * m / (sqrt(v) + tau)``."""
    return first_moment * server_learning_rate / second_moment.sqrt().add_(tau)


def adam_step(
    update: torch.Tensor,
    first_moment: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    server_learning_rate: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FedAdam step: ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``; returns the change, m, v.

    ``d`` (``update``) is the clients' weighted mean of (client - previous). No bias
    correction, as in the paper.
    """
    first = torch.lerp(first_moment, update, 1.0 - beta1)
    second = torch.lerp(second_moment, update * update, 1.0 - beta2)
    change = adaptive_change(first, second, server_learning_rate=server_learning_rate, tau=tau)
    return change, first, second


class FedAdam(Strategy):
    name = "fedadam"
    option_specs = ADAPTIVE_OPTIONS
    state_names = ("first_moment", "second_moment")
    #: The server step: ``(update, m, v, **options) -> (change, m, v)``.
    server_step = staticmethod(adam_step)

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)

    def step(
        self, combined: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        change, first, second = self.server_step(combined, *state, **self.options)
        return change, (first, second)
