"""Which clients make an aggregation's output non-finite, when every input is finite.

Finite inputs can still overflow: a client with values near 3e38 makes ``client - previous``,
a weighted sum, a server-optimiser moment, or the new value rounded to the tensor's dtype
Inf (and NaN after). Every output (weights, server state, statistics) is checked finite
before it is written; when one is not, the culprits are found by leaving clients out, the
largest update first (``magnitudes``), until what is left gives a finite output. Those
clients are left out like NaN clients (their reason names the tensor) and the aggregation is
redone without them. When no client can be blamed (the overflow remains with one client
left), it is the server's options or state: an error, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies import Strategy


def leave_out(
    magnitudes: Sequence[float], finite_without: Callable[[frozenset[int]], bool]
) -> list[int] | None:
    """The clients to leave out: the largest magnitudes first (NaN counts as the largest,
    ties by position), one more at a time, until ``finite_without(those)`` holds; None if
    it does not hold while at least one client remains.

    >>> leave_out([1.0, 3e38, 2.0], lambda out: 1 in out)
    [1]
    >>> leave_out([1.0], lambda out: False) is None
    True
    """
    order = sorted(
        range(len(magnitudes)),
        key=lambda i: (-(math.inf if math.isnan(magnitudes[i]) else magnitudes[i]), i),
    )
    removed: list[int] = []
    for index in order[:-1]:  # at least one client must remain
        removed.append(index)
        if finite_without(frozenset(removed)):
            return sorted(removed)
    return None


def first_non_finite(tensor: torch.Tensor) -> tuple[str, list[int]] | None:
    """``("NaN" or "Inf", index)`` of the tensor's first non-finite element, or None."""
    values = tensor.float() if tensor.element_size() == 1 else tensor  # no float8 kernels
    if math.isfinite(torch.sum(values, dtype=torch.float64).item()):
        return None
    bad = (~torch.isfinite(values)).nonzero()
    if not len(bad):
        return None
    index = [int(i) for i in bad[0]]
    return ("NaN" if math.isnan(float(values[tuple(index)])) else "Inf"), index


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(
        bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()) for t in tensors
    )


def chunk_is_finite(
    strategy: Strategy,
    previous: torch.Tensor,
    clients: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    state: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> bool:
    """Whether ``strategy`` on these clients (in the compute dtype of ``previous``; weights
    renormalised to sum to one) gives finite updates, change, new values in ``dtype`` and
    new server state."""
    compute = previous.dtype
    updates = torch.stack([(c.to(compute) - previous) * s for c, s in zip(clients, scales)])
    if not _all_finite([updates]):
        return False
    total = math.fsum(weights)
    shares = torch.tensor([w / total for w in weights], dtype=compute)
    change, new_state = strategy.step(strategy.combine(updates, shares), [s.clone() for s in state])
    return _all_finite([change, (previous + change).to(dtype), *new_state])


def chunk_culprits(
    strategy: Strategy,
    previous: torch.Tensor,
    clients: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    state: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> dict[int, float] | None:
    """The clients whose leaving out makes this chunk's output finite (index -> the largest
    distance of its values from the previous model's, in float64), or None."""
    wide = previous.double()
    magnitudes = [float((c.double() - wide).abs().max()) if c.numel() else 0.0 for c in clients]

    def finite_without(out: frozenset[int]) -> bool:
        kept = [i for i in range(len(clients)) if i not in out]
        try:
            rule = type(strategy)(options=strategy.options, num_clients=len(kept))
        except AggregationError:  # e.g. too few clients left to trim
            return False
        return chunk_is_finite(
            rule, previous, [clients[i] for i in kept], [weights[i] for i in kept],
            [scales[i] for i in kept], state, dtype,
        )  # fmt: skip

    found = leave_out(magnitudes, finite_without)
    return None if found is None else {i: magnitudes[i] for i in found}
