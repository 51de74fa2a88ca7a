"""The aggregation side's privacy accountant (xffl_tasks.privacy): literal values checked
against Opacus's accountants and against published DP-SGD results. Pure; starts nothing.

Published values: TensorFlow Privacy's MNIST DP-SGD tutorial (tutorials/README.md, "Select
Parameters": 60,000 examples, batches of 256, delta 1e-5) reports epsilon 2.92 for noise 1.12
over 60 epochs, 9.74 for noise 0.6 over 30 epochs and 1.20 for noise 1.2 over 10 epochs. They
come from the RDP of the sampled Gaussian mechanism with the classic conversion
``epsilon = min over orders of RDP(order) + log(1/delta) / (order - 1)`` on TF Privacy's grid of
orders; Opacus's RDP accountant (ours) uses the tighter conversion of Balle et al. (2020), so its
epsilon is lower for the same run: 2.5186 for the first row, and 2.5966 for noise 1.1 (the
Abadi et al. / Opacus MNIST setting), against 3.008 with the classic conversion.
"""

from __future__ import annotations

import math

import pytest

from xffl_tasks.privacy import (
    DpRound,
    PrivacyError,
    epsilon,
    next_round_epsilon,
    noise_for_epsilon,
    params_from_metrics,
)
from xffl_tasks.privacy.accountant import rdp_floor

MNIST_RATE = 256 / 60000
TF_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def mnist_round(noise: float, epochs: int) -> DpRound:
    return DpRound(MNIST_RATE, noise, int(epochs * 60000 // 256))


@pytest.mark.parametrize(
    ("noise", "epochs", "published"), [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)]
)
def test_the_rdp_of_opacus_reproduces_the_published_epsilons(noise, epochs, published):
    from opacus.accountants.analysis.rdp import compute_rdp

    steps = mnist_round(noise, epochs).steps
    rdp = compute_rdp(q=MNIST_RATE, noise_multiplier=noise, steps=steps, orders=TF_ORDERS)
    classic = min(r + math.log(1 / 1e-5) / (order - 1) for r, order in zip(rdp, TF_ORDERS))
    assert classic == pytest.approx(published, abs=0.015)
    # ours: the same RDP, Opacus's tighter conversion: lower than the published bound
    assert epsilon([mnist_round(noise, epochs)], delta=1e-5) < published


def test_literal_epsilons_of_the_mnist_settings():
    assert epsilon([mnist_round(1.1, 60)], delta=1e-5) == pytest.approx(2.5965558689607486, rel=1e-9)
    assert epsilon([mnist_round(1.12, 60)], delta=1e-5) == pytest.approx(2.5185897819186374, rel=1e-9)
    prv = epsilon([mnist_round(1.1, 60)], delta=1e-5, accountant="prv")
    assert prv == pytest.approx(2.391743703391286, rel=1e-6)
    assert prv < epsilon([mnist_round(1.1, 60)], delta=1e-5)  # PRV is the tighter accountant


def test_epsilon_is_the_library_accountants_on_the_same_history():
    from opacus.accountants import PRVAccountant, RDPAccountant

    rounds = [DpRound(0.01, 1.0, 100), DpRound(0.02, 0.8, 50)]
    for name, kind in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        library = kind()
        library.history = [(1.0, 0.01, 100), (0.8, 0.02, 50)]
        assert epsilon(rounds, delta=1e-5, accountant=name) == pytest.approx(
            library.get_epsilon(delta=1e-5), rel=1e-12
        )
    assert epsilon(rounds, delta=1e-5) == pytest.approx(2.897353713559242, rel=1e-9)


def test_composition_across_rounds():
    first, second = DpRound(0.01, 1.0, 100), DpRound(0.02, 0.8, 50)
    both = epsilon([first, second], delta=1e-5)
    assert both == pytest.approx(epsilon([second, first], delta=1e-5), rel=1e-12)
    assert both > max(epsilon([first], delta=1e-5), epsilon([second], delta=1e-5))
    assert epsilon([first], delta=1e-5) == pytest.approx(1.2141452107864754, rel=1e-9)
    # two rounds of 100 steps are one round of 200 steps (RDP adds up)
    assert epsilon([first, first], delta=1e-5) == pytest.approx(
        epsilon([DpRound(0.01, 1.0, 200)], delta=1e-5), rel=1e-12
    )
    assert next_round_epsilon([first], second, delta=1e-5) == both
    assert epsilon([first, DpRound(0.5, 2.0, 0)], delta=1e-5) == epsilon([first], delta=1e-5)


def test_edges_no_steps_and_no_noise():
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([DpRound(0.1, 1.0, 0)], delta=1e-5) == 0.0
    assert epsilon([DpRound(0.1, 1.0, 3), DpRound(0.1, 0.0, 1)], delta=1e-5) == math.inf


def test_noise_for_a_target_epsilon():
    noise = noise_for_epsilon(2.0, sample_rate=8 / 1722, steps=6, delta=1 / 17220)
    assert noise == 0.633544921875
    reached = epsilon([DpRound(8 / 1722, noise, 6)], delta=1 / 17220)
    assert 2.0 - 0.01 <= reached <= 2.0
    # the RDP conversion alone costs 0.1029 at delta 1e-5 (orders up to 63): refused at once
    assert rdp_floor(1e-5) == pytest.approx(0.10286725121127971, rel=1e-9)
    with pytest.raises(PrivacyError, match="^target_epsilon: 0.1 cannot be reached: the rdp"):
        noise_for_epsilon(0.1, sample_rate=0.5, steps=10, delta=1e-5)
    with pytest.raises(PrivacyError, match="^steps: no steps"):
        noise_for_epsilon(1.0, sample_rate=0.5, steps=0, delta=1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((0.0, 1.0, 1), "sample_rate: 0.0 is not in (0, 1]"),
        ((1.5, 1.0, 1), "sample_rate: 1.5 is not in (0, 1]"),
        ((math.nan, 1.0, 1), "sample_rate: nan is not a finite number"),
        ((0.1, -1.0, 1), "noise_multiplier: -1.0 is not in [0, 1e+06]"),
        ((0.1, math.inf, 1), "noise_multiplier: inf is not a finite number"),
        ((0.1, True, 1), "noise_multiplier: True is not a number"),
        ((0.1, 1.0, 2.0), "steps: 2.0 is not a whole number"),
        ((0.1, 1.0, -1), "steps: -1 is not a whole number from 0 to"),
    ],
)
def test_a_round_is_validated(values, message):
    with pytest.raises(PrivacyError, match="^" + message.replace("(", r"\(").replace("[", r"\[").replace("+", r"\+")):
        DpRound(*values)


def test_delta_and_accountant_are_validated():
    rounds = [DpRound(0.1, 1.0, 1)]
    for delta in (0, 1, 1.5, math.nan, "1e-5"):
        with pytest.raises(PrivacyError, match="^delta: "):
            epsilon(rounds, delta=delta)
    with pytest.raises(PrivacyError, match="^accountant: 'gdp' is not one of rdp, prv"):
        epsilon(rounds, delta=1e-5, accountant="gdp")
    with pytest.raises(PrivacyError, match=r"^rounds\[0\]: tuple is not a DpRound"):
        epsilon([(0.1, 1.0, 1)], delta=1e-5)


# a facility's metrics.json "privacy", as a 2-process run on the tiny Czech corpus wrote it
FACILITY = {
    "mode": "dp-sgd", "sample_rate": 0.005420054200542005, "steps": 6, "noise_multiplier": 1.0,
    "max_grad_norm": 1.0, "delta": 6.775067750677507e-05, "accountant": "rdp", "poisson": True,
    "num_train_sequences": 1476, "world_size": 2, "expected_batch_size": 8.0,
    "target_epsilon": None, "epsilon": 0.6627514816342562, "secret_seed": "urandom",
}  # fmt: skip


def test_params_from_a_facility_s_metrics():
    dp_round, delta = params_from_metrics(FACILITY)
    assert dp_round == DpRound(8 / 1476, 1.0, 6)
    assert delta == 1 / (10 * 1476)
    assert epsilon([dp_round], delta=delta) == pytest.approx(FACILITY["epsilon"], rel=1e-12)
    assert params_from_metrics({**FACILITY, "epsilon": None})[0] == dp_round


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": None}, "privacy.steps: None is not a whole number"),
        ({"noise_multiplier": math.nan}, "privacy.noise_multiplier: nan is not a finite number"),
        ({"sample_rate": 0}, "privacy.sample_rate: 0.0 is not in"),
        ({"sample_rate": 1e-4}, "privacy.sample_rate: 0.0001 x 1476 training sequences is less"),
        ({"delta": 1 / 1476}, "privacy.delta: .* is not below 1/N = 1/1476"),
        ({"delta": 0}, "privacy.delta: 0.0 is not in"),
        ({"poisson": False}, "privacy.poisson: False: the accountant assumes Poisson sampling"),
        ({"poisson": 1}, "privacy.poisson: 1: the accountant"),
        ({"mode": "none"}, "privacy.mode: 'none' is not 'dp-sgd'"),
        ({"accountant": "moments"}, "privacy.accountant: 'moments' is not one of rdp, prv"),
        ({"max_grad_norm": 0}, "privacy.max_grad_norm: 0.0 is not in"),
        ({"world_size": 0}, "privacy.world_size: 0 is not a whole number from 1"),
        ({"num_train_sequences": 1.5}, "privacy.num_train_sequences: 1.5 is not a whole number"),
        ({"epsilon": math.inf}, "privacy.epsilon: inf is not a finite number"),
        ({"steps": True}, "privacy.steps: True is not a whole number"),
    ],
)
def test_params_from_metrics_refuse_naming_the_field(change, message):
    with pytest.raises(PrivacyError, match="^" + message):
        params_from_metrics({**FACILITY, **change})


@pytest.mark.parametrize("missing", ["mode", "sample_rate", "steps", "noise_multiplier", "max_grad_norm",
                                     "delta", "accountant", "poisson", "num_train_sequences", "world_size"])  # fmt: skip
def test_params_from_metrics_refuse_a_missing_field(missing):
    privacy = {k: v for k, v in FACILITY.items() if k != missing}
    with pytest.raises(PrivacyError, match=f"^privacy.{missing}: is missing$") as caught:
        params_from_metrics(privacy)
    assert caught.value.field == f"privacy.{missing}"


def test_params_from_metrics_refuse_what_is_not_a_map():
    with pytest.raises(PrivacyError, match="^privacy: list is not a map"):
        params_from_metrics([])
