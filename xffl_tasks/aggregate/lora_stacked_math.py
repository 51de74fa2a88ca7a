"""The arithmetic of ``lora-stacked``: free functions on tensors, no I/O.

Facility ``i`` trains a fresh adapter of its own rank ``r_i`` (B from zero, A from the seed),
so its update to a layer is ``s_i B_i A_i`` with ``s_i = alpha_i / r_i``. The round's update is
exactly

    D = sum_i c_i B_i A_i,   c_i = eta * w_i * s_i

(``w_i`` the normalised weights, ``eta`` the server learning rate), kept as stacked factors,
never as a dense matrix: ``B_stack = [c_1 B_1 | ... | c_n B_n]`` (``[out, K]``) and ``A_stack =
[A_1; ...; A_n]`` (``[K, in]``), ``K = sum r_i``, so that ``D = B_stack @ A_stack``.

Merging (:func:`merge_weight`): ``W' = dtype(W32 + D32)`` where ``D32`` is the sum of the ``K``
rank-one terms ``B_stack[:, k] * A_stack[k, :]`` in stack order, each product and each sum one
float32 operation per element. Every step is a correctly rounded IEEE operation on a single
element, so the bits of ``W'`` depend on the inputs alone: not on the thread count, the CPU's
vector width or a BLAS library (the summation order inside a matrix product is the library's,
and differs between CPUs). The price: about 7 times a float32 matrix product's time (0.7 s for
a 4096 x 4096 layer at K = 128 on one core, against 0.1 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: Rows of the update formed at a time: a block of 256 rows of a 4096-wide layer is 4 MiB,
#: which stays in cache while the K rank-one terms are added to it.
ROWS_PER_BLOCK = 256


def stack_factors(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack, B_stack)`` in float32: the A's one below the other, the ``c_i B_i`` side by
    side (each ``c_i B_i`` formed in float64 and rounded once). Raises ValueError when the
    shapes do not stack."""
    if not a or len(a) != len(b) or len(b) != len(coefficients):
        raise ValueError("stack_factors: one A, one B and one coefficient per client")
    rows, columns = b[0].shape[0], a[0].shape[1]
    for index, (ai, bi) in enumerate(zip(a, b)):
        if ai.dim() != 2 or bi.dim() != 2 or ai.shape[0] != bi.shape[1]:
            raise ValueError(
                f"stack_factors: client {index}: B {list(bi.shape)} @ A {list(ai.shape)} is not a LoRA pair"
            )
        if bi.shape[0] != rows or ai.shape[1] != columns:
            raise ValueError(
                f"stack_factors: client {index}: B {list(bi.shape)} @ A {list(ai.shape)} is not [{rows}, {columns}]"
            )
    a_stack = torch.cat([ai.to(torch.float32) for ai in a], dim=0).contiguous()
    b_stack = torch.cat(
        [(float(c) * bi.to(torch.float64)).to(torch.float32) for c, bi in zip(coefficients, b)],
        dim=1,
    ).contiguous()
    return a_stack, b_stack


def stacked_delta(
    a_stack: torch.Tensor, b_stack: torch.Tensor, *, rows_per_block: int = ROWS_PER_BLOCK
) -> torch.Tensor:
    """``B_stack @ A_stack`` in float32, as the rank-one terms summed in stack order, element
    by element (see the module docstring): the same bits on every machine."""
    if a_stack.dtype != torch.float32 or b_stack.dtype != torch.float32:
        raise ValueError("stacked_delta: the stacked factors must be float32")
    if a_stack.dim() != 2 or b_stack.dim() != 2 or a_stack.shape[0] != b_stack.shape[1]:
        raise ValueError(
            f"stacked_delta: B {list(b_stack.shape)} @ A {list(a_stack.shape)} do not stack"
        )
    rows, rank, columns = b_stack.shape[0], b_stack.shape[1], a_stack.shape[1]
    if rank == 0:
        return torch.zeros(rows, columns, dtype=torch.float32)
    delta = torch.empty(rows, columns, dtype=torch.float32)  # each block's first term fills it
    term = torch.empty(min(rows_per_block, rows), columns, dtype=torch.float32)
    for start in range(0, rows, rows_per_block):
        block = delta[start : start + rows_per_block]
        scratch = term[: block.shape[0]]
        torch.mul(b_stack[start : start + rows_per_block, 0:1], a_stack[0:1], out=block)
        for k in range(1, rank):
            torch.mul(b_stack[start : start + rows_per_block, k : k + 1], a_stack[k : k + 1], out=scratch)
            block.add_(scratch)
    return delta


def merge_weight(
    weight: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', D)``: ``W' = dtype(W + D)`` with ``D`` from :func:`stacked_delta`, the sum taken
    in float32 (float64 for a float64 ``W``) and rounded once to ``W``'s dtype."""
    if weight.dim() != 2 or tuple(weight.shape) != (b_stack.shape[0], a_stack.shape[1]):
        raise ValueError(
            f"merge_weight: B {list(b_stack.shape)} @ A {list(a_stack.shape)} does not fit the weight's {list(weight.shape)}"
        )
    delta = stacked_delta(a_stack, b_stack)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.to(compute, copy=True).add_(delta.to(compute)).to(weight.dtype)
    return merged, delta


def rounding_loss(
    weight: torch.Tensor, merged: torch.Tensor, delta: torch.Tensor, *, rows_per_block: int = 512
) -> tuple[float, float]:
    """``(||D||_F, ||(W' - W) - D||_F / ||D||_F)``: the update's norm and the part of it that
    rounding to the weight's dtype lost (0 for a zero update). A diagnostic: float32 a block of
    rows at a time (float64 for a block whose squares overflow float32), the squares summed by
    dot products, the blocks' sums in float64."""
    delta_sq = lost_sq = 0.0
    for start in range(0, delta.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        for wide in (torch.float32, torch.float64):  # float64 only for a block whose squares overflow
            d = delta[rows].to(wide).flatten()
            lost = merged[rows].to(wide, copy=True).sub_(weight[rows].to(wide))
            lost = lost.flatten().sub_(d)
            block = (float(torch.dot(d, d)), float(torch.dot(lost, lost)))
            if math.isfinite(block[0] + block[1]):
                break
        delta_sq += block[0]
        lost_sq += block[1]
    norm = math.sqrt(delta_sq)
    return norm, (math.sqrt(lost_sq) / norm if norm > 0 else 0.0)


def stacked_statistics(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    coefficients: Sequence[float],
) -> tuple[list[float], list[float], float]:
    """For one layer, in the space of the merged weights: each client's squared update norm
    ``||s_i B_i A_i||^2``, its dot with the round's update ``D = sum c_j B_j A_j``, and
    ``||D||^2``, from ``r_i x r_j`` products (``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i
    A_j^T))``), in float64, never forming a product ``B A``."""
    n = len(a)
    a64 = [t.to(torch.float64) for t in a]
    b64 = [t.to(torch.float64) for t in b]
    gram = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            value = float(((b64[i].T @ b64[j]) * (a64[i] @ a64[j].T)).sum())
            gram[i][j] = gram[j][i] = value
    squared = [max(scalings[i] ** 2 * gram[i][i], 0.0) for i in range(n)]
    dots = [scalings[i] * sum(coefficients[j] * gram[i][j] for j in range(n)) for i in range(n)]
    total = sum(coefficients[i] * coefficients[j] * gram[i][j] for i in range(n) for j in range(n))
    return squared, dots, max(total, 0.0)


def merge_is_finite(
    weight: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    coefficients: Sequence[float],
) -> bool:
    """Whether stacking these clients' ``c_i B_i A_i`` (:func:`stack_factors`) and merging them
    into ``weight`` (:func:`merge_weight`, the same arithmetic) gives finite factors and a
    finite merged weight; no client: whether ``weight`` is finite."""
    from xffl_tasks.aggregate.finite_output import first_non_finite

    if not a:
        return first_non_finite(weight) is None
    a_stack, b_stack = stack_factors(a, b, coefficients)
    if first_non_finite(a_stack) is not None or first_non_finite(b_stack) is not None:
        return False
    return first_non_finite(merge_weight(weight, a_stack, b_stack)[0]) is None


def non_finite_parts(a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int]) -> dict[int, str]:
    """The clients (positions in the stack, ``ranks[i]`` rows of ``A_stack`` and columns of
    ``B_stack`` each) whose own part of a factor holds NaN or Inf -> that factor's suffix."""
    found: dict[int, str] = {}
    offset = 0
    for position, r in enumerate(ranks):
        for factor, part in (("stacked_B", b_stack[:, offset : offset + r]), ("stacked_A", a_stack[offset : offset + r])):
            if position not in found and not bool(torch.isfinite(part).all()):
                found[position] = factor
        offset += r
    return found


def merge_culprits(
    weight: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    coefficients: Sequence[float],
    members: Sequence[int],
    clients: int,
    coefficients_without: Callable[[frozenset[int]], Sequence[float] | None],
) -> tuple[dict[int, float], bool] | None:
    """The clients that make merging their terms into ``weight`` non-finite (``members``: the
    clients, of ``clients``, whose A, B, scaling and coefficient these are, in stack order):
    ``({client: norm of its update of this weight}, own)``. ``own``: the members whose own
    term alone does (:func:`merge_is_finite`). Otherwise the fewest, the largest updates first,
    whose leaving out makes the rest merge finite (``finite_output.leave_out``; at least one
    client remains); ``coefficients_without(out)`` gives the remaining members' coefficients
    (None: no weighting is valid). None when leaving clients out cannot help."""
    from xffl_tasks.aggregate.finite_output import leave_out

    own = {
        i: math.inf for p, i in enumerate(members)
        if not merge_is_finite(weight, a[p : p + 1], b[p : p + 1], coefficients[p : p + 1])
    }  # fmt: skip
    if own:
        return own, True
    norms = [0.0] * clients  # of this weight's update: zero for a client that does not adapt it
    for p, squared in enumerate(stacked_statistics(a, b, scalings, coefficients)[0]):
        norms[members[p]] = math.sqrt(squared)

    def finite_without(out: frozenset[int]) -> bool:
        left = coefficients_without(out)
        stay = [p for p, i in enumerate(members) if i not in out]
        return left is not None and merge_is_finite(weight, [a[p] for p in stay], [b[p] for p in stay], left)

    found = leave_out(norms, finite_without)
    return None if found is None else ({i: norms[i] for i in found}, False)
