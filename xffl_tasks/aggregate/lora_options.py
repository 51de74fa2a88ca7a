"""The adapter strategies and their options, without torch (the DAG processor checks a
federation's ``aggregation`` block with them)."""

from __future__ import annotations

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategy_options import OptionSpec, checked_options

#: Strategies for LoRA adapter folders (``xffl_tasks.aggregate.lora``).
ADAPTER_STRATEGIES = ("lora-fedavg", "lora-exact", "lora-frozen-a")

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

#: Each adapter strategy's options. lora-exact has no momentum: its state would be one full
#: ``[out, in]`` matrix per adapted layer, the size of the base model's adapted weights.
ADAPTER_OPTION_SPECS: dict[str, tuple[OptionSpec, ...]] = {
    "lora-fedavg": (_SERVER_LR, _MOMENTUM),
    "lora-exact": (_SERVER_LR,),
    "lora-frozen-a": (_SERVER_LR, _MOMENTUM),
}


def check_adapter_options(strategy: str, options: dict[str, object]) -> dict[str, float]:
    """Every option of ``strategy``, given or defaulted: known, finite, in range."""
    if strategy not in ADAPTER_OPTION_SPECS:
        raise AggregationError(
            f"strategy {strategy!r} is not an adapter strategy ({', '.join(ADAPTER_STRATEGIES)})"
        )
    return checked_options(strategy, ADAPTER_OPTION_SPECS[strategy], options, defaults=True)
