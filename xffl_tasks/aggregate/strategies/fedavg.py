"""FedAvg (McMahan et al., 2017): the weighted mean of the client models."""

from __future__ import annotations

import torch

from xffl_tasks.aggregate.strategies.base import Strategy


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * updates[k]`` over the clients (``weights`` sum to one)."""
    return weights.to(updates.dtype) @ updates


class FedAvg(Strategy):
    """The next global model is the clients' weighted mean (weights: samples seen, or given)."""

    name = "fedavg"

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)
