"""The strategies' math on tiny tensors with hand-computed results, and their options. Pure."""

from __future__ import annotations

import math

import pytest
import torch

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies import STRATEGIES, make_strategy
from xffl_tasks.aggregate.strategies.fedadam import adam_step
from xffl_tasks.aggregate.strategies.fedavg import weighted_mean
from xffl_tasks.aggregate.strategies.fedavgm import momentum_step
from xffl_tasks.aggregate.strategies.fedyogi import yogi_step
from xffl_tasks.aggregate.strategies.median import coordinate_median
from xffl_tasks.aggregate.strategies.order_statistics import NETWORK_MAX_CLIENTS, sort_clients
from xffl_tasks.aggregate.strategies.trimmed_mean import trimmed_count, trimmed_mean


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_weighted_mean():
    updates = t([1.0, 2.0], [3.0, 4.0])
    assert torch.equal(weighted_mean(updates, t(0.25, 0.75)), t(2.5, 3.5))


def test_momentum_step():
    change, buffer = momentum_step(
        t(1.0, -2.0), t(0.5, 0.5), server_learning_rate=0.1, momentum=0.9
    )
    assert torch.allclose(buffer, t(1.45, -1.55), rtol=0, atol=1e-15)
    assert torch.allclose(change, t(0.145, -0.155), rtol=0, atol=1e-15)


def test_momentum_zero_and_unit_rate_is_fedavg():
    update = t(0.3, -0.7)
    change, buffer = momentum_step(update, t(5.0, 5.0), server_learning_rate=1.0, momentum=0.0)
    assert torch.equal(change, update) and torch.equal(buffer, update)


ADAPTIVE = {"server_learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def test_adam_step():
    change, first, second = adam_step(t(0.2, -0.1), t(0.0, 0.1), t(0.05, 0.0), **ADAPTIVE)
    # m = 0.9 m + 0.1 d; v = 0.99 v + 0.01 d^2; change = 0.01 m / (sqrt(v) + 0.001)
    assert torch.allclose(first, t(0.02, 0.08), rtol=1e-12)
    assert torch.allclose(second, t(0.0499, 0.0001), rtol=1e-12)
    expected = t(0.01 * 0.02 / (math.sqrt(0.0499) + 1e-3), 0.01 * 0.08 / (0.01 + 1e-3))
    assert torch.allclose(change, expected, rtol=1e-12)


def test_yogi_step():
    change, first, second = yogi_step(t(0.2, -0.1), t(0.0, 0.1), t(0.05, 0.0), **ADAPTIVE)
    # v = v - 0.01 d^2 sign(v - d^2): 0.05 - 0.0004 (v > d^2), 0 + 0.0001 (v < d^2)
    assert torch.allclose(first, t(0.02, 0.08), rtol=1e-12)
    assert torch.allclose(second, t(0.0496, 0.0001), rtol=1e-12)
    expected = t(0.01 * 0.02 / (math.sqrt(0.0496) + 1e-3), 0.01 * 0.08 / (0.01 + 1e-3))
    assert torch.allclose(change, expected, rtol=1e-12)


def test_steps_leave_their_inputs_untouched():
    update, first, second = t(0.2, -0.1), t(0.0, 0.1), t(0.05, 0.0)
    for step in (adam_step, yogi_step):
        step(update, first, second, **ADAPTIVE)
    momentum_step(update, first, server_learning_rate=1.0, momentum=0.5)
    assert (
        torch.equal(update, t(0.2, -0.1))
        and torch.equal(first, t(0.0, 0.1))
        and torch.equal(second, t(0.05, 0.0))
    )


FOUR = t([1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0])


def test_trimmed_mean_drops_the_extremes():
    assert torch.equal(trimmed_mean(FOUR, 1), t(2.5, 0.5))
    assert torch.equal(trimmed_mean(FOUR, 0), t(26.5, 1.5))
    with pytest.raises(ValueError):
        trimmed_mean(FOUR, 2)


def test_median_even_and_odd():
    assert torch.equal(coordinate_median(FOUR), t(2.5, 0.5))
    assert torch.equal(coordinate_median(t([1.0, 5.0], [3.0, -1.0], [2.0, 0.0])), t(2.0, 0.0))
    assert torch.equal(coordinate_median(t([4.0, -4.0])), t(4.0, -4.0))


@pytest.mark.parametrize(
    "clients", [1, 2, 3, 4, 5, 8, NETWORK_MAX_CLIENTS, NETWORK_MAX_CLIENTS + 3]
)
def test_sort_clients_sorts_every_column_like_torch_sort(clients):
    updates = torch.randn(clients, 1000, generator=torch.Generator().manual_seed(clients))
    updates[:, :10] = 0.5  # ties
    before = updates.clone()
    assert torch.equal(sort_clients(updates), torch.sort(updates, dim=0).values)
    assert torch.equal(updates, before)


@pytest.mark.parametrize(
    ("clients", "fraction", "trimmed"),
    [(4, 0.2, 1), (3, 0.2, 1), (5, 0.2, 1), (10, 0.3, 3), (20, 0.1, 2)],
)
def test_trimmed_count_rounds_up(clients, fraction, trimmed):
    assert trimmed_count(clients, fraction) == trimmed


def test_options_default_and_validate():
    assert make_strategy("fedadam", num_clients=2).options == ADAPTIVE
    assert make_strategy("fedavgm", options={"momentum": 0}, num_clients=2).options == {
        "server_learning_rate": 1.0,
        "momentum": 0.0,
    }
    assert make_strategy("trimmed-mean", num_clients=5).trim == 1
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "trimmed-mean", "median"}


@pytest.mark.parametrize(
    ("name", "options", "clients", "words"),
    [
        ("fedavg", {"momentum": 0.9}, 2, ["'momentum'", "none"]),
        ("fedavgm", {"momentum": 1.0}, 2, ["'momentum'", "[0, 1)"]),
        ("fedadam", {"tau": 0.0}, 2, ["'tau'", "(0, 1]"]),
        ("fedyogi", {"beta2": True}, 2, ["'beta2'", "number"]),
        ("fedadam", {"server_learning_rate": math.inf}, 2, ["'server_learning_rate'"]),
        ("trimmed-mean", {}, 2, ["trim_fraction", "at least 3"]),
        ("krum", {}, 4, ["'krum'", "fedavg, fedavgm"]),
    ],
)
def test_bad_options_name_the_field(name, options, clients, words):
    with pytest.raises(AggregationError) as error:
        make_strategy(name, options=options, num_clients=clients)
    for word in words:
        assert word in str(error.value)
