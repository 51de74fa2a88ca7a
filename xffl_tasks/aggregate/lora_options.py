"""The adapter strategies, their options and the ranks they accept, without torch (the DAG
processor checks a federation's ``aggregation`` block and its facilities' LoRA settings with
them)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from xffl_tasks.adapter import MAX_RANK
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategy_options import OptionSpec, checked_options

#: Strategies for LoRA adapter folders (``xffl_tasks.aggregate.lora``; ``lora-stacked``:
#: ``xffl_tasks.aggregate.lora_stacked``).
ADAPTER_STRATEGIES = ("lora-fedavg", "lora-svd", "lora-frozen-a", "lora-stacked")
#: Old names, refused everywhere with what to use instead.
RENAMED_STRATEGIES: dict[str, str] = {
    "lora-exact": (
        "lora-exact was renamed lora-svd (the best rank-r approximation, not exact); "
        "for exact aggregation use lora-stacked"
    ),
}
#: The one adapter strategy whose facilities may train different ranks (and alphas).
MIXED_RANKS = frozenset({"lora-stacked"})

_SERVER_LR = OptionSpec(
    "server_learning_rate",
    1.0,
    0.0,
    1e3,
    low_open=True,
    help="step size on the averaged adapter update",
)
_MOMENTUM = OptionSpec(
    "momentum", 0.0, 0.0, 1.0, high_open=True, help="server momentum (FedAvgM) on A and B"
)

#: Each adapter strategy's options. lora-svd and lora-stacked have no momentum (see
#: ``REFUSED_OPTIONS``). lora-stacked's server learning rate scales the stacked B.
ADAPTER_OPTION_SPECS: dict[str, tuple[OptionSpec, ...]] = {
    "lora-fedavg": (_SERVER_LR, _MOMENTUM),
    "lora-svd": (_SERVER_LR,),
    "lora-frozen-a": (_SERVER_LR, _MOMENTUM),
    "lora-stacked": (_SERVER_LR,),
}
_DENSE_STATE = (
    "its state would be one dense [out, in] matrix per adapted layer, the size of the base "
    "model's adapted weights (use server_learning_rate, or momentum with lora-fedavg or "
    "lora-frozen-a)"
)
#: (strategy, option) -> why the strategy does not offer it.
REFUSED_OPTIONS: dict[tuple[str, str], str] = {
    ("lora-svd", "momentum"): f"lora-svd cannot keep server momentum: {_DENSE_STATE}",
    ("lora-stacked", "momentum"): (
        "lora-stacked cannot keep server momentum: each round's update is a new stack of the "
        f"facilities' factors, so the momentum of the merged updates is dense; {_DENSE_STATE}"
    ),
}


def check_adapter_strategy(strategy: str) -> str:
    """``strategy`` if it is an adapter strategy; an old name is refused with its new one."""
    if strategy in RENAMED_STRATEGIES:
        raise AggregationError(RENAMED_STRATEGIES[strategy])
    if strategy not in ADAPTER_OPTION_SPECS:
        raise AggregationError(
            f"strategy {strategy!r} is not an adapter strategy ({', '.join(ADAPTER_STRATEGIES)})"
        )
    return strategy


def check_adapter_options(strategy: str, options: dict[str, object]) -> dict[str, float]:
    """Every option of ``strategy``, given or defaulted: known, finite, in range; an option the
    strategy cannot offer (momentum of lora-svd or lora-stacked) is refused with the reason."""
    check_adapter_strategy(strategy)
    for name in sorted(options):
        if (strategy, name) in REFUSED_OPTIONS:
            raise AggregationError(
                f"option {name!r} is not an option of {strategy}: {REFUSED_OPTIONS[strategy, name]}"
            )
    return checked_options(strategy, ADAPTER_OPTION_SPECS[strategy], options, defaults=True)


def _rank_and_alpha(facility: str, value: object) -> tuple[int, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise AggregationError(f"facility {facility!r}: expected (r, alpha), got {value!r}")
    r, alpha = value
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise AggregationError(
            f"facility {facility!r}: LoRA r must be a whole number from 1 to {MAX_RANK}, got {r!r}"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise AggregationError(
            f"facility {facility!r}: LoRA alpha must be a positive number, got {alpha!r}"
        )
    return r, float(alpha)


def check_ranks(strategy: str, ranks: Mapping[str, object]) -> dict[str, tuple[int, float]]:
    """Each facility's ``(r, alpha)``, checked: valid values, and one ``(r, alpha)`` for every
    facility unless ``strategy`` stacks the facilities' factors (lora-stacked). A mix is
    refused naming each facility's rank. Returns ``{facility: (r, alpha)}``."""
    check_adapter_strategy(strategy)
    checked = {name: _rank_and_alpha(name, value) for name, value in ranks.items()}
    if strategy in MIXED_RANKS or len(set(checked.values())) <= 1:
        return checked
    listed = ", ".join(f"{name} (r={r}, alpha={alpha:g})" for name, (r, alpha) in checked.items())
    raise AggregationError(
        f"{strategy} cannot mix LoRA ranks or alphas: facilities {listed}; give every facility "
        "the same r and alpha, or use lora-stacked (it stacks the facilities' factors, any rank)"
    )
