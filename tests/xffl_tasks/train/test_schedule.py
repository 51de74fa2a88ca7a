"""Step plans, data order and the learning-rate schedule: pure arithmetic on literal values.
Starts nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xffl_tasks.train.config import ConfigError
from xffl_tasks.train.schedule import (
    epoch_order,
    lr_factor,
    plan_steps,
    rank_micro_batches,
    step_groups,
)


def plan(**overrides):
    arguments = {
        "num_sequences": 10, "world_size": 2, "batch_size": 2, "gradient_accumulation": 2, "epochs": 1.0,
        "max_steps": None, "seq_len": 64,
    }  # fmt: skip
    arguments.update(overrides)
    return plan_steps(**arguments)


def test_steps_per_epoch():
    # 10 sequences over 2 ranks: 5 each, micro-batches of 2 -> 3 (2, 2, 1), 2 per step -> 2 steps.
    p = plan()
    assert (p.per_rank, p.micro_batches_per_epoch, p.steps_per_epoch, p.total_steps) == (5, 3, 2, 2)
    assert plan(epochs=2.5).total_steps == 5
    assert plan(epochs=0.1).total_steps == 1
    assert plan(max_steps=7, epochs=100).total_steps == 7
    # an odd sequence is dropped so every rank reads as many
    assert plan(num_sequences=11).per_rank == 5


def test_too_little_data_is_an_error():
    with pytest.raises(ConfigError, match="1 training sequence.*fewer than the 2 processes"):
        plan(num_sequences=1)


def test_every_rank_reads_distinct_sequences_each_epoch():
    p = plan(num_sequences=9, world_size=2, batch_size=2)
    seen = []
    for rank in range(2):
        batches = rank_micro_batches(p, seed=3, epoch=0, rank=rank)
        assert [len(b) for b in batches] == [2, 2]
        seen += [int(i) for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) <= set(range(9))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(10, seed=1, epoch=0), epoch_order(10, seed=1, epoch=0))
    assert not np.array_equal(epoch_order(10, seed=1, epoch=0), epoch_order(10, seed=1, epoch=1))
    assert not np.array_equal(epoch_order(10, seed=1, epoch=0), epoch_order(10, seed=2, epoch=0))
    assert sorted(epoch_order(10, seed=1, epoch=0)) == list(range(10))


def test_step_groups():
    batches = [np.array([i]) for i in range(5)]
    assert [[int(b[0]) for b in g] for g in step_groups(batches, 2)] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        (
            "cosine",
            [
                0.5,
                1.0,
                1.0,
                (1 + math.cos(math.pi / 4)) / 2,
                0.5,
                (1 + math.cos(3 * math.pi / 4)) / 2,
            ],
        ),
    ],
)
def test_lr_factor_with_warmup(schedule, expected):
    got = [lr_factor(s, total_steps=6, warmup_steps=2, schedule=schedule) for s in range(6)]
    assert got == pytest.approx(expected)


def test_lr_factor_floor_and_single_step():
    assert lr_factor(
        3, total_steps=4, warmup_steps=0, schedule="linear", min_ratio=0.2
    ) == pytest.approx(0.4)
    assert lr_factor(0, total_steps=1, warmup_steps=0, schedule="cosine") == 1.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        lr_factor(0, total_steps=1, warmup_steps=0, schedule="step")
