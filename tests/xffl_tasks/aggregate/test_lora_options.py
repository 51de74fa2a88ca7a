"""The adapter strategies' torch-free checks (what the DAG processor runs when it builds a
federation): names, options with the reasons for the refused ones, and ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.lora_options import (
    ADAPTER_OPTION_SPECS,
    ADAPTER_STRATEGIES,
    check_adapter_options,
    check_ranks,
)


def test_the_strategies_and_their_options():
    assert ADAPTER_STRATEGIES == ("lora-fedavg", "lora-svd", "lora-frozen-a", "lora-stacked")
    assert tuple(ADAPTER_OPTION_SPECS) == ADAPTER_STRATEGIES
    assert check_adapter_options("lora-stacked", {}) == {"server_learning_rate": 1.0}
    assert check_adapter_options("lora-stacked", {"server_learning_rate": 0.5}) == {
        "server_learning_rate": 0.5
    }
    assert check_adapter_options("lora-fedavg", {"momentum": 0.9})["momentum"] == 0.9


@pytest.mark.parametrize("strategy", ["lora-stacked", "lora-svd"])
def test_momentum_is_refused_with_the_reason(strategy):
    with pytest.raises(AggregationError, match=f"not an option of {strategy}: .*dense \\[out, in\\] matrix"):
        check_adapter_options(strategy, {"momentum": 0.9})


def test_the_old_name_is_refused_pointing_to_both_new_ones():
    message = (
        "lora-exact was renamed lora-svd (the best rank-r approximation, not exact); "
        "for exact aggregation use lora-stacked"
    )
    for check in (lambda: check_adapter_options("lora-exact", {}), lambda: check_ranks("lora-exact", {})):
        with pytest.raises(AggregationError) as caught:
            check()
        assert str(caught.value) == message


def test_mixed_ranks_only_under_lora_stacked():
    ranks = {"it": (4, 8.0), "cz": (16, 32), "de": (4, 8.0)}
    assert check_ranks("lora-stacked", ranks) == {"it": (4, 8.0), "cz": (16, 32.0), "de": (4, 8.0)}
    for strategy in ("lora-fedavg", "lora-svd", "lora-frozen-a"):
        with pytest.raises(AggregationError) as caught:
            check_ranks(strategy, ranks)
        text = str(caught.value)
        assert text.startswith(f"{strategy} cannot mix LoRA ranks")
        assert "it (r=4, alpha=8), cz (r=16, alpha=32), de (r=4, alpha=8)" in text
        assert "use lora-stacked" in text
        assert check_ranks(strategy, {"it": (8, 16.0), "cz": (8, 16.0)}) == {"it": (8, 16.0), "cz": (8, 16.0)}
    with pytest.raises(AggregationError, match="alphas"):
        check_ranks("lora-fedavg", {"it": (8, 16.0), "cz": (8, 8.0)})


@pytest.mark.parametrize(
    "value, problem",
    [((0, 8.0), "r must be"), ((4097, 8.0), "r must be"), ((True, 8.0), "r must be"),
     ((4, 0), "alpha must be"), ((4, float("nan")), "alpha must be"), (4, "expected \\(r, alpha\\)")],
)  # fmt: skip
def test_bad_ranks_name_the_facility(value, problem):
    with pytest.raises(AggregationError, match=f"facility 'cz': .*{problem}"):
        check_ranks("lora-stacked", {"it": (4, 8.0), "cz": value})


def test_the_checks_import_no_torch():
    code = (
        "import sys; from xffl_tasks.aggregate.lora_options import check_ranks, check_adapter_options; "
        "check_ranks('lora-stacked', {'a': (4, 8.0)}); check_adapter_options('lora-stacked', {}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
