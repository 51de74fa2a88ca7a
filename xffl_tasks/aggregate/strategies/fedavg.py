"""FedAvg (McMahan et al., 2017): the weighted mean of the client models."""

from __future__ import annotations

import torch

from xffl_tasks.aggregate.strategies.base import Strategy


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * updates[k]`` over the clients (``weights`` sum to one), summed one
    client after another in the order given (name order), each product rounded before it is
    added: the compiled kernels' arithmetic, bit for bit. A matrix product would sum in an
    order (and with fused multiply-adds) that depends on the CPU's BLAS kernels."""
    weights = weights.to(updates.dtype)
    mean = torch.mul(updates[0], weights[0])
    if len(updates) > 1:
        product = torch.empty_like(mean)
        for update, weight in zip(updates[1:], weights[1:]):
            mean.add_(torch.mul(update, weight, out=product))
    return mean


class FedAvg(Strategy):
    """The next global model is the clients' weighted mean (weights: samples seen, or given)."""

    name = "fedavg"

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)
