"""FedYogi (Reddi et al., 2021): FedAdam with Yogi's additive second-moment update."""

from __future__ import annotations

import torch

from xffl_tasks.aggregate.strategies.fedadam import FedAdam, adaptive_change


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


class FedYogi(FedAdam):
    """FedAdam's options, state and rule; Yogi's second moment."""

    name = "fedyogi"
    server_step = staticmethod(yogi_step)
