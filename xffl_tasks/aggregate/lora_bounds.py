"""The norm bound and the finite-output check of the adapter strategies (``lora``).

A client's adapter update is measured on the adapter tensors themselves: ``||T_i - T_0||``
over every A and B matrix (float64), the same space for lora-fedavg, lora-svd and
lora-frozen-a (whose A does not move). Clipping scales it there: ``T_0 + s (T_i - T_0)`` for
every tensor, which every strategy then aggregates as it would the client's own adapter
(for the merged weights ``B A`` this is not a scaling by ``s``, but it bounds both factors'
moves, and so the merged update, by ``s`` times the limit and its square).

An aggregation whose output (the adapter in its dtype, the momentum state in float32) or
statistics are not finite leaves out clients, the largest update first, until what remains
is finite (``finite_output.leave_out``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.finite_output import leave_out
from xffl_tasks.aggregate.update_bounds import BoundOutcome, NormBound, apply_norm_bound

Tensors = Mapping[str, torch.Tensor]


def adapter_norm(prior: Tensors, tensors: Tensors) -> float:
    """``||T - T_0||`` over every tensor of the adapter, in float64 (inf if it overflows)."""
    total = 0.0
    for key, before in prior.items():
        difference = tensors[key].double() - before.double()
        total += torch.dot(difference.reshape(-1), difference.reshape(-1)).item()
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clipped(prior: Tensors, tensors: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """``T_0 + scale (T - T_0)`` for every tensor, in float64."""
    return {
        key: before.double() + scale * (tensors[key].double() - before.double())
        for key, before in prior.items()
    }


def bound_norms(
    names: Sequence[str], prior: Tensors, clients: Sequence[Tensors], bound: NormBound
) -> BoundOutcome:
    """The norm bound applied to the clients' adapters (``update_bounds.apply_norm_bound``);
    a norm that overflows float64 counts as infinite (clipped to the limit, or refused)."""
    norms = {name: adapter_norm(prior, tensors) for name, tensors in zip(names, clients)}
    finite = {name: norm for name, norm in norms.items() if math.isfinite(norm)}
    outcome = apply_norm_bound(finite or {name: 0.0 for name in norms}, bound)
    scales, refused = dict(outcome.scales), dict(outcome.refused)
    for name, norm in norms.items():
        if math.isfinite(norm):
            continue
        if bound.action == "refuse":
            refused[name] = f"client {name!r}: update norm overflows float64 (norm_bound refuse)"
        else:
            scales[name] = 0.0
    return BoundOutcome(bound, outcome.median, outcome.limit, norms, scales, refused)


def bound_adapters(prior: Tensors, accepted: list[tuple], bound: NormBound):
    """``accepted`` (name, adapter, weight) bounded: the refused ones dropped, the clipped ones
    with clipped tensors (the adapter dataclass's ``tensors`` replaced); and the outcome."""
    outcome = bound_norms(
        [name for name, _, _ in accepted], prior, [a.tensors for _, a, _ in accepted], bound
    )
    kept = []
    for name, adapter, weight in accepted:
        if name in outcome.scales:
            adapter = replace(
                adapter, tensors=clipped(prior, adapter.tensors, outcome.scales[name])
            )
        if name not in outcome.refused:
            kept.append((name, adapter, weight))
    return kept, outcome


def all_finite(tensors: Sequence[torch.Tensor], numbers: Sequence[float]) -> bool:
    """Whether every tensor element and every number is finite."""
    return all(math.isfinite(x) for x in numbers) and all(
        bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()) for t in tensors
    )


def culprits(
    magnitudes: Sequence[float], finite_without: Callable[[frozenset[int]], bool], what: str
) -> dict[int, str]:
    """The clients to leave out so that the output is finite (index -> reason); an
    AggregationError when leaving clients out cannot make it finite."""
    found = leave_out(magnitudes, finite_without)
    if found is None:
        raise AggregationError(f"the {what} output is not finite (server options out of range?)")
    return {
        index: f"its adapter (update norm {magnitudes[index]:.6g}) makes the {what} output "
        "non-finite"
        for index in found
    }
