"""Differential privacy, the aggregation side: the accountant that composes a facility's
DP-SGD rounds (:mod:`xffl_tasks.privacy.accountant`; Opacus underneath). See docs/privacy.md."""

from xffl_tasks.privacy.accountant import (
    ACCOUNTANTS,
    DpRound,
    PrivacyError,
    epsilon,
    next_round_epsilon,
    noise_for_epsilon,
    params_from_metrics,
)

__all__ = [
    "ACCOUNTANTS",
    "DpRound",
    "PrivacyError",
    "epsilon",
    "next_round_epsilon",
    "noise_for_epsilon",
    "params_from_metrics",
]
