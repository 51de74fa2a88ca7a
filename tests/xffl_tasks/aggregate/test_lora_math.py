"""The adapter strategies' arithmetic on tiny hand-computed matrices. Starts no process."""

from __future__ import annotations

import math

import pytest
import torch

from xffl_tasks.aggregate import lora_math

T = torch.tensor


def test_average_factors_averages_a_and_b_separately():
    a, b = lora_math.average_factors(
        [T([[1.0, 2.0]]), T([[3.0, 4.0]])], [T([[2.0], [0.0]]), T([[6.0], [4.0]])], [0.25, 0.75]
    )
    assert a.tolist() == [[2.5, 3.5]]
    assert b.tolist() == [[5.0], [3.0]]


# Two rank-1 clients on orthogonal directions: M = 0.75 e1 e1^T + 0.25 e2 e2^T = diag(0.75, 0.25).
CLIENT_A = [T([[1.0, 0.0]]), T([[0.0, 1.0]])]
CLIENT_B = [T([[1.0], [0.0]]), T([[0.0], [1.0]])]
WEIGHTS = [0.75, 0.25]


def test_fedavg_of_factors_is_not_the_mean_of_products():
    a, b = lora_math.average_factors(CLIENT_A, CLIENT_B, WEIGHTS)
    # (0.75, 0.25)^T (0.75, 0.25), not diag(0.75, 0.25)
    assert (b @ a).tolist() == [[0.5625, 0.1875], [0.1875, 0.0625]]


@pytest.mark.parametrize("randomised", [False, True])
def test_svd_keeps_the_largest_singular_direction_and_reports_the_rest(randomised):
    result = lora_math.svd_factors(CLIENT_A, CLIENT_B, WEIGHTS, 1, randomised=randomised)
    assert torch.allclose(
        result.b @ result.a, T([[0.75, 0.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-12
    )
    # what rank 1 cannot hold: ||diag(0, 0.25)|| / ||diag(0.75, 0.25)|| = 1 / sqrt(10)
    assert result.residual == pytest.approx(1 / math.sqrt(10), rel=1e-9)
    assert result.method == ("randomised" if randomised else "factored")
    assert result.a.shape == (1, 2) and result.b.shape == (2, 1)


def test_svd_with_enough_rank_is_the_mean_of_products():
    a = [T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 1.0], [0.0, 0.0]])]
    b = [T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [1.0, 0.0]])]
    result = lora_math.svd_factors(a, b, WEIGHTS, 2)
    assert torch.allclose(
        result.b @ result.a, T([[0.75, 0.0], [0.0, 0.25]], dtype=torch.float64), atol=1e-12
    )
    assert result.residual == pytest.approx(0.0, abs=1e-12)


def test_svd_on_random_layers_matches_a_dense_svd():
    torch.manual_seed(0)
    a = [torch.randn(4, 24) for _ in range(3)]
    b = [torch.randn(16, 4) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    dense = sum(wi * bi.double() @ ai.double() for wi, ai, bi in zip(w, a, b))
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    for randomised in (False, True):
        result = lora_math.svd_factors(a, b, w, 4, randomised=randomised)
        assert torch.allclose(result.b @ result.a, best, atol=1e-6 if randomised else 1e-10)
        expected = math.sqrt(float((s[4:] ** 2).sum()) / float((s**2).sum()))
        assert result.residual == pytest.approx(expected, rel=1e-4 if randomised else 1e-9)


def test_svd_with_a_server_learning_rate_moves_part_of_the_way():
    # eta = 0.5 from B0 A0 = diag(1, 0) towards M = diag(0, 1): 0.5 diag(1, 1), rank 2 held
    a = [T([[0.0, 1.0], [0.0, 0.0]]), T([[1.0, 0.0], [0.0, 0.0]])]
    b = [T([[0.0, 0.0], [1.0, 0.0]]), T([[1.0, 0.0], [0.0, 0.0]])]
    result = lora_math.svd_factors(a, b, [0.5, 0.5], 2)
    assert torch.allclose(result.b @ result.a, 0.5 * torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_frozen_a_averaging_b_is_exact():
    a0 = T([[1.0, 2.0]])
    b = [T([[1.0], [3.0]]), T([[5.0], [-1.0]])]
    a, mean_b = lora_math.frozen_a_factors(a0, b, [0.5, 0.5])
    assert mean_b.tolist() == [[3.0], [1.0]]
    mean_of_products = 0.5 * (b[0] @ a0) + 0.5 * (b[1] @ a0)
    assert torch.equal(mean_b @ a, mean_of_products.double())


def test_update_statistics_are_those_of_the_products():
    torch.manual_seed(1)
    prior = (torch.randn(2, 5), torch.randn(3, 2))
    clients = [(torch.randn(2, 5), torch.randn(3, 2)) for _ in range(2)]
    result = (torch.randn(2, 5), torch.randn(3, 2))
    squared, dots, change = lora_math.update_statistics(prior, clients, result)
    p0 = prior[1].double() @ prior[0].double()
    delta = result[1].double() @ result[0].double() - p0
    for index, (a, bb) in enumerate(clients):
        update = bb.double() @ a.double() - p0
        assert squared[index] == pytest.approx(float((update**2).sum()), rel=1e-9)
        assert dots[index] == pytest.approx(float((update * delta).sum()), rel=1e-9)
    assert change == pytest.approx(float((delta**2).sum()), rel=1e-9)
