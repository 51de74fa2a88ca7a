"""The privacy accountant of a federation: the epsilon of a facility's DP-SGD rounds, composed.

Each round a facility trains with DP-SGD on its own records reports its sampling rate, noise
multiplier and steps (metrics.json ``privacy``); a :class:`DpRound` holds them. ``epsilon``
composes every round of one facility, heterogeneous parameters allowed, with Opacus's own
accountants (``rdp``: Renyi DP of the sampled Gaussian mechanism, converted to (epsilon, delta)
with Opacus's conversion; ``prv``: the privacy-loss random variable accountant of Gopi et al.,
tighter). Facilities hold disjoint records, so each one's epsilon is its records' guarantee
(parallel composition); a federation's budget is the largest of them.

Pure: no I/O, no global state; every error is a :class:`PrivacyError` naming the field.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
#: The largest noise multiplier (Opacus's own search stops at 1e6).
MAX_NOISE_MULTIPLIER = 1e6
MAX_STEPS = 10**12
MAX_SEQUENCES = 10**15
MAX_WORLD_SIZE = 10**6


class PrivacyError(ValueError):
    """A privacy parameter is missing, ill-typed, non-finite or out of range; ``field`` names
    it (``sample_rate``, ``privacy.delta``...)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def _number(
    field: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(field, f"{value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise PrivacyError(field, "is not a finite number") from None
    if not math.isfinite(number):
        raise PrivacyError(field, f"{number!r} is not a finite number")
    if number < low or number > high or (low_open and number == low) or (high_open and number == high):
        brackets = ("(" if low_open else "[", ")" if high_open else "]")
        raise PrivacyError(field, f"{number!r} is not in {brackets[0]}{low:g}, {high:g}{brackets[1]}")
    return number


def _whole(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrivacyError(field, f"{value!r} is not a whole number")
    if not low <= value <= high:
        raise PrivacyError(field, f"{value!r} is not a whole number from {low} to {high}")
    return value


def check_delta(delta: Any, field: str = "delta") -> float:
    """``delta`` as a float in (0, 1)."""
    return _number(field, delta, 0.0, 1.0, low_open=True, high_open=True)


def check_accountant(accountant: Any, field: str = "accountant") -> str:
    """``accountant`` when it is one of ``ACCOUNTANTS``."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(field, f"{accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    return accountant


@dataclass(frozen=True)
class DpRound:
    """One DP-SGD run of a facility: ``steps`` steps of the sampled Gaussian mechanism, each
    record in a step's batch with probability ``sample_rate`` (Poisson sampling), Gaussian
    noise of ``noise_multiplier`` x the clipping norm."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        _number("sample_rate", self.sample_rate, 0.0, 1.0, low_open=True)
        _number("noise_multiplier", self.noise_multiplier, 0.0, MAX_NOISE_MULTIPLIER)
        _whole("steps", self.steps, 0, MAX_STEPS)


def _accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon(rounds: Sequence[DpRound], *, delta: float, accountant: str = "rdp") -> float:
    """The epsilon at ``delta`` of all ``rounds`` composed (in any order): 0.0 for no steps,
    ``math.inf`` when a round with steps has no noise."""
    delta = check_delta(delta)
    check_accountant(accountant)
    for index, item in enumerate(rounds):
        if not isinstance(item, DpRound):
            raise PrivacyError(f"rounds[{index}]", f"{type(item).__name__} is not a DpRound")
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds if r.steps > 0]
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    counter = _accountant(accountant)
    counter.history = history
    with warnings.catch_warnings():  # the PRV grid's log(0) and overflow, handled by it
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(counter.get_epsilon(delta=delta))
    if math.isnan(value) or value < 0:
        raise PrivacyError("rounds", f"the {accountant} accountant gave epsilon {value!r}")
    return value


def next_round_epsilon(
    history: Sequence[DpRound], next_round: DpRound, *, delta: float, accountant: str = "rdp"
) -> float:
    """The epsilon the facility would reach after ``history`` and then ``next_round``: what a
    budget check compares with the budget before it starts the round."""
    return epsilon([*history, next_round], delta=delta, accountant=accountant)


def rdp_floor(delta: float) -> float:
    """The rdp accountant's epsilon at ``delta`` for infinite noise (its orders' conversion
    alone): no target at or below it can be reached with that accountant."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():  # "optimal order is the largest alpha": as expected here
        warnings.simplefilter("ignore", UserWarning)
        spent = get_privacy_spent(orders=orders, rdp=[0.0] * len(orders), delta=check_delta(delta))
    return float(spent[0])


def noise_for_epsilon(
    target_epsilon: float, *, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance, 0.01 in epsilon) with which
    ``steps`` steps at ``sample_rate`` stay within ``target_epsilon`` at ``delta`` (Opacus's
    ``get_noise_multiplier``)."""
    target = _number("target_epsilon", target_epsilon, 0.0, MAX_NOISE_MULTIPLIER, low_open=True)
    DpRound(sample_rate, 1.0, steps)
    if steps < 1:
        raise PrivacyError("steps", "no steps to calibrate the noise for")
    delta = check_delta(delta)
    if check_accountant(accountant) == "rdp":  # no noise gets the RDP conversion below this
        floor = rdp_floor(delta)
        if target <= floor:
            raise PrivacyError(
                "target_epsilon",
                f"{target:g} cannot be reached: the rdp accountant's epsilon at delta {delta:g} "
                f"is above {floor:.4g} whatever the noise (try prv)",
            )
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                    steps=steps, accountant=accountant,
                )
            )  # fmt: skip
    except ValueError as error:  # "The privacy budget is too low."
        raise PrivacyError("target_epsilon", f"{target:g} cannot be reached: {error}") from None


#: metrics.json ``privacy``: field -> what it must be.
METRICS_FIELDS = (
    "mode", "sample_rate", "steps", "noise_multiplier", "max_grad_norm", "delta", "accountant",
    "poisson", "num_train_sequences", "world_size",
)  # fmt: skip


def params_from_metrics(privacy: Mapping[str, Any]) -> tuple[DpRound, float]:
    """``(round, delta)`` from a facility's metrics.json ``privacy`` map, strictly: every field
    of ``METRICS_FIELDS`` present and in range (``epsilon``, informational, may be absent or
    null); a PrivacyError names the first field that is not (``privacy.<field>``)."""
    if not isinstance(privacy, Mapping):
        raise PrivacyError("privacy", f"{type(privacy).__name__} is not a map")
    for name in METRICS_FIELDS:
        if name not in privacy:
            raise PrivacyError(f"privacy.{name}", "is missing")
    if privacy["mode"] != "dp-sgd":
        raise PrivacyError("privacy.mode", f"{privacy['mode']!r} is not 'dp-sgd'")
    if privacy["poisson"] is not True:
        raise PrivacyError(
            "privacy.poisson", f"{privacy['poisson']!r}: the accountant assumes Poisson sampling"
        )
    check_accountant(privacy["accountant"], "privacy.accountant")
    sequences = _whole("privacy.num_train_sequences", privacy["num_train_sequences"], 1, MAX_SEQUENCES)
    _whole("privacy.world_size", privacy["world_size"], 1, MAX_WORLD_SIZE)
    _number("privacy.max_grad_norm", privacy["max_grad_norm"], 0.0, 1e12, low_open=True)
    rate = _number("privacy.sample_rate", privacy["sample_rate"], 0.0, 1.0, low_open=True)
    if rate * sequences < 1 - 1e-9:
        raise PrivacyError(
            "privacy.sample_rate",
            f"{rate!r} x {sequences} training sequences is less than one sequence a step",
        )
    delta = check_delta(privacy["delta"], "privacy.delta")
    if delta * sequences >= 1:
        raise PrivacyError(
            "privacy.delta", f"{delta!r} is not below 1/N = 1/{sequences} (N training sequences)"
        )
    reported = privacy.get("epsilon")
    if reported is not None:
        _number("privacy.epsilon", reported, 0.0, 1e12)
    noise = _number("privacy.noise_multiplier", privacy["noise_multiplier"], 0.0, MAX_NOISE_MULTIPLIER)
    steps = _whole("privacy.steps", privacy["steps"], 0, MAX_STEPS)
    return DpRound(rate, noise, steps), delta
