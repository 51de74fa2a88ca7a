"""lora-stacked's arithmetic on tiny tensors: the stack, the fixed-order float32 update, the
merge and its rounding, checked against hand-computed values and a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from xffl_tasks.aggregate import lora_stacked_math as m

T = torch.tensor


def test_the_stack_puts_the_scaled_bs_side_by_side_and_the_as_one_below_the_other():
    a1, b1 = T([[1.0, 2.0]]), T([[1.0], [3.0]])  # r = 1
    a2, b2 = T([[0.0, 1.0], [1.0, 0.0]]), T([[1.0, 0.0], [0.0, 2.0]])  # r = 2
    a_stack, b_stack = m.stack_factors([a1, a2], [b1, b2], [2.0, 0.5])
    assert a_stack.tolist() == [[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]]
    assert b_stack.tolist() == [[2.0, 0.5, 0.0], [6.0, 0.0, 1.0]]
    assert a_stack.dtype == b_stack.dtype == torch.float32
    # B_stack @ A_stack = 2 B1 A1 + 0.5 B2 A2 = 2 [[1, 2], [3, 6]] + 0.5 [[0, 1], [2, 0]]
    assert m.stacked_delta(a_stack, b_stack).tolist() == [[2.0, 4.5], [7.0, 12.0]]


def test_shapes_that_do_not_stack_are_refused():
    with pytest.raises(ValueError, match="is not \\[2, 2\\]"):
        m.stack_factors([T([[1.0, 2.0]]), T([[1.0, 2.0, 3.0]])], [T([[1.0], [1.0]])] * 2, [1.0, 1.0])
    with pytest.raises(ValueError, match="not a LoRA pair"):
        m.stack_factors([T([[1.0, 2.0]])], [T([[1.0, 1.0], [1.0, 1.0]])], [1.0])


def test_the_rank_one_terms_are_added_in_stack_order_in_float32():
    # terms 1e8, 1, -1e8 on one element: in float32, (1e8 + 1) rounds to 1e8, so the fixed
    # order gives 0 (another order, or float64, would give 1): the bits are the order's
    a_stack = T([[1.0], [1.0], [1.0]])
    b_stack = T([[1e8, 1.0, -1e8]])
    assert m.stacked_delta(a_stack, b_stack).item() == 0.0
    assert m.stacked_delta(a_stack, T([[1e8, -1e8, 1.0]])).item() == 1.0


def test_blocks_of_rows_do_not_change_a_bit():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 33, generator=generator)
    b = torch.randn(37, 20, generator=generator)
    whole = m.stacked_delta(a, b, rows_per_block=1000)
    for rows in (1, 5, 16, 36):
        assert torch.equal(m.stacked_delta(a, b, rows_per_block=rows), whole)
    assert torch.allclose(whole.double(), b.double() @ a.double(), rtol=1e-5, atol=1e-5)


def test_the_merge_rounds_once_to_the_weight_dtype_and_reports_what_rounding_lost():
    one = torch.ones(1, 1, dtype=torch.bfloat16)  # bf16 spacing at 1.0 is 2^-7
    a = T([[1.0]])
    merged_small, delta = m.merge_weight(one, a, T([[2.0**-9]]))  # under half a spacing: lost
    assert merged_small.dtype == torch.bfloat16 and merged_small.item() == 1.0
    norm, lost = m.rounding_loss(one, merged_small, delta)
    assert norm == 2.0**-9 and lost == 1.0
    merged_big, delta = m.merge_weight(one, a, T([[3 * 2.0**-9]]))  # over half: one spacing up
    assert merged_big.item() == 1.0 + 2.0**-7
    assert m.rounding_loss(one, merged_big, delta)[1] == pytest.approx(1 / 3)
    assert m.rounding_loss(one, one, torch.zeros(1, 1)) == (0.0, 0.0)


def test_the_merge_and_its_statistics_leave_their_inputs_alone():
    weight = torch.zeros(2, 2)
    merged, delta = m.merge_weight(weight, T([[1.0, 1.0]]), T([[1.0], [1.0]]))
    assert weight.tolist() == [[0.0, 0.0], [0.0, 0.0]] and merged.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert m.rounding_loss(weight, merged, delta) == (2.0, 0.0)
    assert merged.tolist() == [[1.0, 1.0], [1.0, 1.0]] and delta.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def _mixed_ranks(dtype: torch.dtype):
    """A 24 x 20 weight, facilities of r = 4 (alpha 8) and r = 16 (alpha 32), weights 1:3."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 20, generator=generator).to(dtype)
    ranks, alphas, shares = [4, 16], [8.0, 32.0], [0.25, 0.75]
    a = [torch.randn(r, 20, generator=generator) for r in ranks]
    b = [torch.randn(24, r, generator=generator) / 10 for r in ranks]
    coefficients = [w * alpha / r for w, alpha, r in zip(shares, alphas, ranks)]
    reference = weight.double() + sum(
        c * (bi.double() @ ai.double()) for c, ai, bi in zip(coefficients, a, b)
    )  # W0 + sum w_i s_i B_i A_i, in float64
    return weight, a, b, coefficients, reference


def test_mixed_ranks_merge_to_w0_plus_the_weighted_scaled_products_float32():
    weight, a, b, coefficients, reference = _mixed_ranks(torch.float32)
    merged, _ = m.merge_weight(weight, *m.stack_factors(a, b, coefficients))
    assert merged.dtype == torch.float32
    # float32 rounding: the stacked factors, 20 rank-one terms and the sum with W
    assert torch.allclose(merged.double(), reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


def test_mixed_ranks_merge_to_w0_plus_the_weighted_scaled_products_bf16():
    weight, a, b, coefficients, reference = _mixed_ranks(torch.bfloat16)
    merged, _ = m.merge_weight(weight, *m.stack_factors(a, b, coefficients))
    assert merged.dtype == torch.bfloat16
    # within half a bf16 spacing of the exact result (2^-8 relative), plus float32's share
    gap = (merged.double() - reference).abs()
    assert bool((gap <= reference.abs() * 2.0**-8 * (1 + 1e-4) + 1e-6).all())
    # and it is the exact result rounded to bf16 wherever float32 could not tip the rounding
    assert (merged == reference.to(torch.bfloat16)).double().mean() > 0.99


def test_statistics_are_those_of_the_dense_products():
    generator = torch.Generator().manual_seed(2)
    a = [torch.randn(r, 6, generator=generator) for r in (1, 3)]
    b = [torch.randn(5, r, generator=generator) for r in (1, 3)]
    scalings, coefficients = [2.0, 0.5], [0.6, 0.3]
    squared, dots, total = m.stacked_statistics(a, b, scalings, coefficients)
    products = [bi.double() @ ai.double() for ai, bi in zip(a, b)]
    update = sum(c * p for c, p in zip(coefficients, products))
    for i, (s, p) in enumerate(zip(scalings, products)):
        assert squared[i] == pytest.approx(float(((s * p) ** 2).sum()))
        assert dots[i] == pytest.approx(float((s * p * update).sum()))
    assert total == pytest.approx(float((update**2).sum()))


def test_rounding_loss_takes_a_block_whose_squares_overflow_float32_in_float64():
    weight = torch.zeros(2, 1)
    merged, delta = m.merge_weight(weight, T([[1.0]]), T([[2e38], [1.0]]))  # finite; its square is not
    norm, lost = m.rounding_loss(weight, merged, delta, rows_per_block=1)
    assert norm == pytest.approx(2e38) and lost == 0.0


def test_which_clients_make_a_merge_non_finite():
    weight = torch.zeros(1, 1, dtype=torch.bfloat16)
    one = T([[1.0]])
    assert m.merge_is_finite(weight, [one, one], [T([[1e38]]), T([[1e38]])], [1.0, 1.0])
    assert not m.merge_is_finite(weight, [one, one], [T([[3e38]]), T([[1e38]])], [1.0, 1.0])  # the sum
    assert not m.merge_is_finite(weight, [one], [T([[3e38]])], [2.0])  # c B beyond float32
    assert m.merge_is_finite(weight, [], [], []) and not m.merge_is_finite(weight * float("nan"), [], [], [])
    # the parts of the stacked factors: client 1 (r = 2) holds the Inf of the stacked B
    a_stack, b_stack = m.stack_factors([one, T([[1.0], [1.0]])], [T([[1.0]]), T([[1.0, 3e38]])], [1.0, 2.0])
    assert m.non_finite_parts(a_stack, b_stack, [1, 2]) == {1: "stacked_B"}
    # its own term alone: client 1 of 3 (client 2 does not adapt this weight)
    found = m.merge_culprits(weight, [one, one], [T([[1.0]]), T([[3e38]])], [1.0, 1.0], [1.0, 2.0],
                             [0, 1], 3, lambda out: None)  # fmt: skip
    assert found == ({1: math.inf}, True)
    # finite alone, not together: the largest left out first, the weights renormalised
    coefficients = {frozenset({0}): [1.0], frozenset({1}): [1.0]}
    found = m.merge_culprits(weight, [one, one], [T([[2e38]]), T([[3e38]])], [1.0, 1.0], [1.0, 1.0],
                             [0, 1], 2, coefficients.get)  # fmt: skip
    assert found == ({1: pytest.approx(3e38)}, False)
    # one client must remain: nobody to blame
    assert m.merge_culprits(weight, [one, one], [T([[2e38]]), T([[3e38]])], [1.0, 1.0], [1.0, 1.0],
                            [0, 1], 2, lambda out: None) is None  # fmt: skip
