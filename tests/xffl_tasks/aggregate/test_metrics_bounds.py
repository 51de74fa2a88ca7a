"""Sane ranges in metrics.json (issue 22 item 3): losses of +-1e308 passed as finite, and the UI
and the report's plots then failed. Every number field now has a bound. Literal bytes only."""

from __future__ import annotations

import json

import pytest

from xffl_tasks.aggregate.metrics import LOSSES, NUMBER_BOUNDS, MetricsError, parse_metrics


def parse(**fields) -> dict:
    return parse_metrics(json.dumps({"num_samples": 4, **fields}).encode(), "site1")


@pytest.mark.parametrize("field", LOSSES)
@pytest.mark.parametrize("value", [1e308, -1e308, 1e6 + 1, -2e6])
def test_losses_beyond_a_million_are_refused(field, value):
    with pytest.raises(MetricsError) as raised:
        parse(**{field: value})
    assert str(raised.value) == (
        f"client 'site1': metrics.json {field} {value!r} is not a number from -1e+06 to 1e+06"
    )


@pytest.mark.parametrize("field", LOSSES)
def test_losses_within_a_million_are_kept(field):
    assert parse(**{field: -1e6})[field] == -1e6
    assert parse(**{field: 2})[field] == 2.0


@pytest.mark.parametrize(
    ("field", "low", "high"),
    [
        ("epochs", 0.0, 1e6),
        ("seconds", 0.0, 1e8),
        ("total_seconds", 0.0, 1e8),
        ("step_seconds_median", 0.0, 1e8),
        ("cpu_seconds", 0.0, 1e11),
        ("tokens_per_second", 0.0, 1e12),
        ("learning_rate_last", 0.0, 1e3),
    ],
)
def test_each_number_field_has_its_range(field, low, high):
    assert NUMBER_BOUNDS[field] == (low, high)
    assert parse(**{field: low})[field] == low and parse(**{field: high})[field] == high
    for outside in (low - 1, high * 2):
        with pytest.raises(MetricsError, match=f"metrics.json {field} .* is not a number from"):
            parse(**{field: outside})


def test_numbers_in_maps_are_bounded_like_counts():
    assert parse(hyperparameters={"lr": 1e-4, "x": -1e18})["hyperparameters"] == {
        "lr": 1e-4,
        "x": -1e18,
    }
    with pytest.raises(
        MetricsError, match=r"metrics.json hyperparameters.lr 1e\+300 is not a number"
    ):
        parse(hyperparameters={"lr": 1e300})


def test_a_training_run_s_metrics_pass():
    metrics = {
        "num_samples": 512, "num_tokens": 65536, "val_loss_before": 5.61, "val_loss_after": 4.2,
        "val_tokens": 4096, "val_sequences": 32, "train_loss": 4.8, "train_loss_last": 4.3,
        "train_sequences": 256, "epochs": 2.0, "steps": 64, "seconds": 12.5, "cpu_seconds": 80.1,
        "step_seconds_median": 0.18, "tokens_per_second": 5242.9, "learning_rate_last": 0.0,
        "world_size": 2, "threads": 4, "seed": 1234, "seq_len": 128, "total_seconds": 20.0,
    }  # fmt: skip
    assert parse_metrics(json.dumps(metrics).encode(), "site1") == {
        k: float(v) if k in NUMBER_BOUNDS else v for k, v in metrics.items()
    }
