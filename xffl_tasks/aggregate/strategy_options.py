"""The strategies' options: names, defaults and intervals, without torch.

The federation config checks ``aggregation.options`` against these tables when the DAG is
built (the DAG processor never imports torch); the strategies validate with the same specs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from xffl_tasks.aggregate.errors import AggregationError


@dataclass(frozen=True)
class OptionSpec:
    """One hyperparameter: its default and the interval it must lie in."""

    name: str
    default: float
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    help: str = ""

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, strategy: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise AggregationError(
                f"option {self.name!r} of {strategy} must be a number, got {value!r}"
            )
        number = float(value)
        below = number < self.low or (self.low_open and number == self.low)
        above = number > self.high or (self.high_open and number == self.high)
        if not math.isfinite(number) or below or above:
            raise AggregationError(
                f"option {self.name!r} of {strategy} must be in {self.interval()}, got {value!r}"
            )
        return number


#: The options FedAdam and FedYogi share; defaults as in Reddi et al. (tau 1e-3), with a
#: server learning rate small enough for fine-tuning a large model.
ADAPTIVE_OPTIONS = (
    OptionSpec(
        "server_learning_rate", 1e-2, 0.0, 1e3, low_open=True, help="eta, the server step size"
    ),
    OptionSpec("beta1", 0.9, 0.0, 1.0, high_open=True, help="decay of the first moment"),
    OptionSpec("beta2", 0.99, 0.0, 1.0, high_open=True, help="decay of the second moment"),
    OptionSpec(
        "tau",
        1e-3,
        0.0,
        1.0,
        low_open=True,
        help="adaptivity: added to the root of the second moment",
    ),
)

#: Each strategy's options, by strategy name.
OPTION_SPECS: dict[str, tuple[OptionSpec, ...]] = {
    "fedavg": (),
    "fedavgm": (
        OptionSpec(
            "server_learning_rate", 1.0, 0.0, 1e3, low_open=True, help="step size on the momentum"
        ),
        OptionSpec("momentum", 0.9, 0.0, 1.0, high_open=True, help="server momentum (beta)"),
    ),
    "fedadam": ADAPTIVE_OPTIONS,
    "fedyogi": ADAPTIVE_OPTIONS,
    "trimmed-mean": (
        OptionSpec(
            "trim_fraction",
            0.2,
            0.0,
            0.5,
            low_open=True,
            high_open=True,
            help="fraction of the clients dropped at each end, rounded up",
        ),
    ),
    "median": (),
}


def check_options(strategy: str, options: dict[str, object]) -> dict[str, float]:
    """``options`` of ``strategy`` checked against its specs: known names, finite, in range."""
    if strategy not in OPTION_SPECS:
        raise AggregationError(
            f"strategy {strategy!r} is unknown: choose one of {', '.join(OPTION_SPECS)}"
        )
    return checked_options(strategy, OPTION_SPECS[strategy], options)


def checked_options(
    strategy: str,
    specs: tuple[OptionSpec, ...],
    options: Mapping[str, object],
    *,
    defaults: bool = False,
) -> dict[str, float]:
    """``options`` checked against ``specs``: known names, finite, in range. With ``defaults``,
    every spec's value (given or defaulted); else only the given ones."""
    known = {spec.name: spec for spec in specs}
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(known) or "none"
        raise AggregationError(
            f"option {unknown[0]!r} is not an option of {strategy} (accepted: {accepted})"
        )
    if defaults:
        return {name: spec.check(strategy, options.get(name, spec.default)) for name, spec in known.items()}
    return {name: known[name].check(strategy, value) for name, value in options.items()}
