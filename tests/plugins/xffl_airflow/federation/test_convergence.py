"""Convergence rules, on hand-made round histories."""

from __future__ import annotations

import math

import pytest
from xffl_airflow.federation.convergence import RoundOutcome, decide, weighted_loss


def rounds(*losses, norms=None):
    norms = norms or [1.0] * len(losses)
    return [RoundOutcome(i, loss, norm) for i, (loss, norm) in enumerate(zip(losses, norms))]


def test_weighted_loss_ignores_missing_and_non_finite():
    assert weighted_loss({"a": 2.0, "b": 4.0}, {"a": 3, "b": 1}) == pytest.approx(2.5)
    assert weighted_loss({"a": 2.0, "b": None, "c": math.nan}, {"a": 1, "b": 5, "c": 5}) == 2.0
    assert weighted_loss({}, {}) is None


def test_stops_at_max_rounds():
    assert decide(rounds(5.0, 4.0), max_rounds=3).stop is False
    decision = decide(rounds(5.0, 4.0, 3.0), max_rounds=3)
    assert decision.stop and "max_rounds" in decision.reason and decision.improvement == 1.0


def test_stops_when_improvement_stalls_for_patience_rounds():
    kwargs = {"max_rounds": 100, "min_improvement": 0.1}
    assert decide(rounds(5.0, 4.0, 3.95), patience=2, **kwargs).stop is False  # one slow round
    assert decide(rounds(5.0, 4.0, 3.95, 3.9), patience=2, **kwargs).stop is True
    assert decide(rounds(5.0, 4.0, 3.95), patience=1, **kwargs).stop is True
    assert decide(rounds(5.0, 4.0, 3.95), patience=1, max_rounds=100).stop is False  # rule disabled


def test_stops_on_small_global_update():
    decision = decide(rounds(5.0, 4.0, norms=[1.0, 1e-6]), max_rounds=10, min_update_norm=1e-3)
    assert decision.stop and "update norm" in decision.reason


def test_missing_losses_never_stop_on_improvement():
    assert decide(rounds(5.0, None, 4.99), max_rounds=10, min_improvement=0.5).stop is False
