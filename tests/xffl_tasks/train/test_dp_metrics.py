"""What a dp-sgd run's metrics.json may carry (``dp_options.release_metrics``), on literal
metrics with hand-computed counts; the ``--dp-withhold-validation`` flag; and a plain run,
whose metrics are the loop's own numbers, untouched by any of it.

Starts nothing but one plain training run of the tiny model, in this process.
"""

from __future__ import annotations

import json

import pytest

from xffl_tasks.aggregate.metrics import parse_metrics
from xffl_tasks.train.__main__ import main, parse_arguments
from xffl_tasks.train.config import TrainingConfig
from xffl_tasks.train.dp_options import (
    EXPECTED_FIELDS,
    PUBLIC_FIELDS,
    VALIDATION_LOSSES,
    WITHHELD_FIELDS,
    PrivacyPlan,
    expected_num_samples,
    release_metrics,
)
from xffl_tasks.train.loop import TrainingResult
from xffl_tasks.train.recipe import run

PATHS = ["--model", "/m", "--data", "/d", "--out", "/o"]
#: 8 expected of 1476 (q = 8/1476), one process.
PLAN = PrivacyPlan(8 / 1476, 1 / 14760, 1476, 1, 8)
METRICS = {
    "num_samples": 71, "num_tokens": 71 * 64, "val_loss_before": 7.5, "val_loss_after": 7.25,
    "val_tokens": 504, "val_sequences": 8, "train_loss": 7.4, "train_loss_last": 7.3,
    "train_loss_curve": [7.5, 7.3], "train_loss_curve_every": 1, "train_sequences": 1476,
    "epochs": 71 / 1476, "steps": 8, "seconds": 2.0, "cpu_seconds": 3.0,
    "step_seconds_median": 0.25, "tokens_per_second": 71 * 64 / 2.0, "learning_rate_last": 0.003,
    "seed": 0, "seq_len": 64, "something_new": 1.0,
}  # fmt: skip


def test_the_expected_count_is_the_expected_batch_times_the_steps():
    assert expected_num_samples(PLAN, 8) == 64  # round(8/1476 x 1476) x 8
    assert expected_num_samples(PrivacyPlan(3 / 7, 0.01, 7, 1, 3), 5) == 15
    assert expected_num_samples(PLAN, 0) == 0


def test_release_keeps_the_public_fields_and_recomputes_the_counts():
    released = release_metrics(METRICS, plan=PLAN, steps=8, seq_len=64, withhold_validation=False)
    assert released == {
        "num_samples": 64, "num_tokens": 64 * 64, "val_loss_before": 7.5, "val_loss_after": 7.25,
        "val_tokens": 504, "val_sequences": 8, "train_sequences": 1476, "epochs": 64 / 1476,
        "steps": 8, "seconds": 2.0, "cpu_seconds": 3.0, "step_seconds_median": 0.25,
        "tokens_per_second": 64 * 64 / 2.0, "learning_rate_last": 0.003, "seed": 0, "seq_len": 64,
    }  # fmt: skip
    assert list(released) == [name for name in METRICS if name in released]  # same order
    # an unclassified field ("something_new") stays at the facility, as the training losses do
    assert METRICS["num_samples"] == 71  # the input is not changed


def test_release_can_withhold_the_validation_losses():
    released = release_metrics(METRICS, plan=PLAN, steps=8, seq_len=64, withhold_validation=True)
    assert not {*VALIDATION_LOSSES, *WITHHELD_FIELDS} & set(released)
    assert (released["val_tokens"], released["val_sequences"], released["num_samples"]) == (504, 8, 64)


def test_no_seconds_gives_no_rate():
    released = release_metrics(
        {**METRICS, "seconds": 0.0}, plan=PLAN, steps=8, seq_len=64, withhold_validation=False
    )
    assert released["tokens_per_second"] == 0.0


def test_the_dp_withhold_validation_flag():
    config = parse_arguments(
        PATHS + ["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--dp-withhold-validation"]
    )
    assert config.dp_withhold_validation is True
    assert parse_arguments(PATHS).dp_withhold_validation is False
    assert TrainingConfig().hyperparameters()["dp_withhold_validation"] is False


def test_dp_withhold_validation_needs_dp_sgd(capsys):
    assert main(PATHS + ["--dp-withhold-validation"]) == 2
    assert "--dp-withhold-validation: only with --dp-mode dp-sgd" in capsys.readouterr().err


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    """A plain run of 3 steps of 4 x 2 sequences, and the loop's own result."""
    from xffl_tasks.train import loop

    out = tmp_path_factory.mktemp("plain") / "out"
    config = TrainingConfig(
        model=str(tiny / "model"), data=str(tiny / "data" / "czech"), out=str(out), seq_len=64,
        learning_rate=0.003, precision="fp32", val_max_sequences=8, log_every=2, batch_size=4,
        gradient_accumulation=2, max_steps=3, threads=1,
    )  # fmt: skip
    seen: list[TrainingResult] = []
    original = loop.train

    def train(*args, **kwargs) -> TrainingResult:
        seen.append(original(*args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", train)
        returned = run(config, environ={})
    return out, returned, seen[0]


def test_a_plain_run_reports_the_loop_s_own_numbers(plain):
    out, returned, result = plain
    metrics = json.loads((out / "metrics.json").read_text())
    assert returned == metrics
    assert sorted(metrics) == [  # the fields before DP-SGD came: no privacy map
        "cpu_seconds", "data", "device", "epochs", "finished_at", "hyperparameters", "launcher",
        "learning_rate_last", "model", "num_samples", "num_tokens", "parallelism", "precision",
        "seconds", "seed", "seq_len", "started_at", "step_seconds_median", "steps", "threads",
        "tokens_per_second", "total_seconds", "train_loss", "train_loss_curve",
        "train_loss_curve_every", "train_loss_last", "train_sequences", "val_loss_after",
        "val_loss_before", "val_sequences", "val_tokens", "versions", "world_size",
    ]  # fmt: skip
    assert (metrics["num_samples"], metrics["num_tokens"]) == (3 * 4 * 2, 3 * 4 * 2 * 64)
    assert (result.num_samples, result.num_tokens, result.steps) == (24, 24 * 64, 3)
    assert metrics["train_loss"] == result.train_loss
    assert metrics["train_loss_last"] == result.train_loss_last
    assert (metrics["train_loss_curve_every"], metrics["train_loss_curve"]) == (1, list(result.step_losses))
    assert metrics["epochs"] == 24 / 1476
    assert metrics["tokens_per_second"] == result.num_tokens / result.seconds
    assert metrics["seconds"] == result.seconds and metrics["val_tokens"] == 8 * 63
    assert metrics["val_loss_after"] < metrics["val_loss_before"]


def test_every_field_of_a_plain_run_is_classified(plain):
    """A field the recipe writes is public, recomputed, a validation loss or withheld in a
    dp-sgd run; an unclassified one would silently stay at the facility: classify it."""
    out, _, _ = plain
    metrics = json.loads((out / "metrics.json").read_text())
    classes = (PUBLIC_FIELDS, EXPECTED_FIELDS, VALIDATION_LOSSES, WITHHELD_FIELDS)
    assert sum(len(c) for c in classes) == len(set().union(*classes))  # disjoint
    assert set(metrics) <= set().union(*classes)
    assert set(parse_metrics((out / "metrics.json").read_bytes(), "czech")) <= set(metrics)
