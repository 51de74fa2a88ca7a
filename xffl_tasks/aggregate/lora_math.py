"""The arithmetic of LoRA adapter aggregation: free functions on tensors, no I/O.

One LoRA layer is a pair ``(A, B)``, ``A`` of ``[r, in]`` and ``B`` of ``[out, r]``; the layer
adds ``scaling * B @ A`` to the base weight. Every client starts the round from the global
``(A0, B0)`` and returns its own ``(A_i, B_i)``; ``w_i`` are the normalised weights.

- :func:`average_factors` (``lora-fedavg``): ``sum w_i A_i`` and ``sum w_i B_i``. Cheap and
  common, but ``(sum w_i B_i)(sum w_i A_i)`` is not ``sum w_i B_i A_i``: inexact.
- :func:`svd_factors` (``lora-svd``): the weighted mean of the products ``M = sum w_i
  B_i A_i`` (with a server learning rate ``eta``: ``B0 A0 + eta (M - B0 A0)``), re-factorised
  to rank ``r`` by a truncated SVD: the best rank-``r`` approximation, not ``M`` itself. ``M`` is never formed: it is ``[w_1 B_1 ... w_n B_n] @
  [A_1; ...; A_n]``, a product of an ``[out, n r]`` and an ``[n r, in]`` matrix, so two thin QR
  decompositions and the SVD of an ``[n r, n r]`` core give its singular values exactly, in
  ``O((out + in) (n r)^2)``. Only when ``n r`` reaches the layer's smaller side does forming
  ``M`` and a randomised SVD (``torch.svd_lowrank``) pay. What rank ``r`` cannot hold is
  returned as ``||M - B A||_F / ||M||_F``. ``lora-stacked`` keeps ``M`` whole instead, as the
  stacked factors (``lora_stacked_math``).
- :func:`frozen_a_factors` (``lora-frozen-a``): every client kept the round's ``A``, so
  ``sum w_i B_i A = (sum w_i B_i) A``: averaging ``B`` is exact.

Everything runs in float64; callers round once to the adapter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Oversampling and power iterations of the randomised SVD.
OVERSAMPLE = 8
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class Factored:
    """A re-factorised layer: ``B @ A`` approximates ``target``; ``residual`` is the part
    rank r could not hold, relative (``||target - B A||_F / ||target||_F``, 0 for a zero
    target); ``method`` says how the SVD was taken (``factored`` or ``randomised``)."""

    a: torch.Tensor
    b: torch.Tensor
    residual: float
    method: str


def _weights(weights: Sequence[float]) -> torch.Tensor:
    return torch.tensor([float(w) for w in weights], dtype=torch.float64)


def average_factors(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum w_i A_i, sum w_i B_i)``: lora-fedavg, element-wise like FedAvg."""
    w = _weights(weights)
    return (
        torch.einsum("c,c...->...", w, torch.stack([t.double() for t in a])),
        torch.einsum("c,c...->...", w, torch.stack([t.double() for t in b])),
    )


def frozen_a_factors(
    a0: torch.Tensor, b: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, sum w_i B_i)``: exact when every client kept ``A0``."""
    w = _weights(weights)
    return a0.double(), torch.einsum("c,c...->...", w, torch.stack([t.double() for t in b]))


def _split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U S V^T`` truncated to ``rank`` as ``(A, B)`` with ``B = U sqrt(S)``, ``A = sqrt(S) V^T``
    (zero-padded when fewer singular values exist)."""
    k = min(rank, s.shape[0])
    root = s[:k].clamp_min(0).sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a, b


def svd_factors(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    rank: int,
    *,
    randomised: bool | None = None,
    seed: int = 0,
) -> Factored:
    """The best rank-``rank`` factorisation of ``M = sum c_j B_j A_j`` (Eckart-Young).

    ``coefficients`` may be negative (the server learning rate's ``1 - eta`` on the previous
    adapter). ``randomised``: None chooses (randomised only when the stacked rank reaches the
    layer's smaller side); True or False forces it.
    """
    c = [float(x) for x in coefficients]
    b_cat = torch.cat([cj * bj.double() for cj, bj in zip(c, b)], dim=1)  # [out, k]
    a_cat = torch.cat([aj.double() for aj in a], dim=0)  # [k, in]
    out_features, in_features, stacked = b_cat.shape[0], a_cat.shape[1], b_cat.shape[1]
    if randomised is None:
        randomised = stacked >= min(out_features, in_features)
    if randomised:
        target = b_cat @ a_cat
        norm = torch.linalg.matrix_norm(target).item()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            q = min(rank + OVERSAMPLE, min(out_features, in_features))
            u, s, v = torch.svd_lowrank(target, q=q, niter=POWER_ITERATIONS)
        finally:
            torch.random.set_rng_state(generator_state)
        new_a, new_b = _split(u, s, v.T, rank)
        left = torch.linalg.matrix_norm(target - new_b @ new_a).item()
        return Factored(new_a, new_b, left / norm if norm > 0 else 0.0, "randomised")
    q_b, r_b = torch.linalg.qr(b_cat)  # [out, k'], [k', k]
    q_a, r_a = torch.linalg.qr(a_cat.T)  # [in, k''], [k'', k]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the core: [k', k'']
    new_a, new_b = _split(q_b @ u, s, vh @ q_a.T, rank)
    total = float((s**2).sum())
    left = float((s[rank:] ** 2).sum())
    return Factored(new_a, new_b, math.sqrt(left / total) if total > 0 else 0.0, "factored")


def product_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """``<B1 A1, B2 A2>_F`` without forming either product: ``sum((B1^T B2) * (A1 A2^T))``."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def update_statistics(
    prior: tuple[torch.Tensor, torch.Tensor],
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
    result: tuple[torch.Tensor, torch.Tensor],
) -> tuple[list[float], list[float], float]:
    """For one layer, in the space of the merged weight ``B A``: each client's squared update
    norm ``||B_i A_i - B0 A0||^2``, its dot with the applied change ``B' A' - B0 A0``, and the
    change's squared norm. Factors ``(A, B)``; every product stays ``r x r``."""
    terms = [prior, *clients, result]
    a = torch.stack([term[0].double() for term in terms])  # [k, r, in]
    b = torch.stack([term[1].double() for term in terms])  # [k, out, r]
    # <B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T)), all pairs at once
    gram = (
        (torch.einsum("iar,jas->ijrs", b, b) * torch.einsum("irx,jsx->ijrs", a, a))
        .sum((2, 3))
        .tolist()
    )
    last = len(terms) - 1

    def dot(i: int, j: int) -> float:  # <P_i - P_0, P_j - P_0>
        return gram[i][j] - gram[i][0] - gram[0][j] + gram[0][0]

    squared = [max(dot(i, i), 0.0) for i in range(1, last)]
    dots = [dot(i, last) for i in range(1, last)]
    return squared, dots, max(dot(last, last), 0.0)
