"""The run's schedule, as pure arithmetic: how many optimizer steps, which sequences each
process reads at each step, and the learning-rate factor at each step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xffl_tasks.train.config import ConfigError


@dataclass(frozen=True)
class StepPlan:
    """How the training sequences are cut into steps.

    Every epoch, the ``num_sequences`` training sequences are shuffled (the same order on every
    process), cut to a multiple of ``world_size`` and dealt round-robin, so each process reads
    ``per_rank`` of them in micro-batches of ``batch_size`` (the last may be smaller), and
    ``gradient_accumulation`` micro-batches make an optimizer step (the last may have fewer).
    """

    num_sequences: int
    world_size: int
    batch_size: int
    gradient_accumulation: int
    total_steps: int

    @property
    def per_rank(self) -> int:
        return self.num_sequences // self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.gradient_accumulation)


def plan_steps(
    *,
    num_sequences: int,
    world_size: int,
    batch_size: int,
    gradient_accumulation: int,
    epochs: float,
    max_steps: int | None,
    seq_len: int,
) -> StepPlan:
    """The step plan; ``max_steps`` wins over ``epochs``. Too little data is an error."""
    if num_sequences < world_size:
        raise ConfigError(
            f"data: {num_sequences} training sequence(s) of seq_len {seq_len} tokens, fewer than the "
            f"{world_size} processes; give more data or a smaller seq_len"
        )
    plan = StepPlan(num_sequences, world_size, batch_size, gradient_accumulation, total_steps=0)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * plan.steps_per_epoch))
    return StepPlan(num_sequences, world_size, batch_size, gradient_accumulation, total_steps=total)


def epoch_order(num_sequences: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the training sequences in ``epoch`` (identical on every process)."""
    generator = np.random.Generator(np.random.PCG64([seed, epoch]))
    return generator.permutation(num_sequences)


def rank_micro_batches(plan: StepPlan, *, seed: int, epoch: int, rank: int) -> list[np.ndarray]:
    """The sequence indices of each of ``rank``'s micro-batches in ``epoch``."""
    order = epoch_order(plan.num_sequences, seed=seed, epoch=epoch)[
        : plan.per_rank * plan.world_size
    ]
    mine = order[rank :: plan.world_size]
    return [mine[start : start + plan.batch_size] for start in range(0, len(mine), plan.batch_size)]


def step_groups(
    micro_batches: list[np.ndarray], gradient_accumulation: int
) -> list[list[np.ndarray]]:
    """Groups an epoch's micro-batches into optimizer steps."""
    return [
        micro_batches[i : i + gradient_accumulation]
        for i in range(0, len(micro_batches), gradient_accumulation)
    ]


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Warm-up rises linearly to the peak over ``warmup_steps`` steps (the first step already
    learns, at 1/warmup_steps); then ``constant`` stays at the peak, ``linear`` and ``cosine``
    fall towards ``min_ratio`` of it, reached one step after the last (as in ``transformers``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"lr_schedule: {schedule!r} is not one of constant, cosine, linear")
