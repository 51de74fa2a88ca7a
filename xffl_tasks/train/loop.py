"""The training loop and the validation pass."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xffl_tasks.data.tokens import Sequences
from xffl_tasks.train.config import TrainingConfig, TrainingError
from xffl_tasks.train.distributed import (
    Runtime,
    accumulation_context,
    all_reduce_sum,
    autocast,
    grad_norm,
    loss_of,
    reshard,
)
from xffl_tasks.train.schedule import StepPlan, lr_factor, rank_micro_batches, step_groups

log = logging.getLogger(__name__)
MAX_CURVE_POINTS = 200  # metrics.json stays small (the aggregation reads at most 64 KiB of it)


class DivergedError(TrainingError):
    """The loss or the gradient became NaN or infinite."""


@dataclass(frozen=True)
class Evaluation:
    loss: float
    tokens: int


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    num_samples: int
    num_tokens: int
    train_loss: float
    train_loss_last: float
    seconds: float
    cpu_seconds: float
    step_seconds_median: float
    learning_rate_last: float
    step_losses: tuple[float, ...] = ()

    @property
    def loss_curve(self) -> tuple[int, list[float]]:
        """``(every, points)`` of :func:`loss_curve`: at most ``MAX_CURVE_POINTS`` points."""
        return loss_curve(self.step_losses)


def loss_curve(losses: Sequence[float], limit: int = MAX_CURVE_POINTS) -> tuple[int, list[float]]:
    """``(every, points)``: the per-step training losses when there are at most ``limit``,
    else the means of ``every`` consecutive steps (the last group may be shorter), so that
    there are at most ``limit`` points."""
    every = max(1, math.ceil(len(losses) / limit))
    points = [
        sum(losses[start : start + every]) / len(losses[start : start + every])
        for start in range(0, len(losses), every)
    ]
    return every, points


def sequence_losses(model: torch.nn.Module, batch: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The summed next-token cross-entropy of each sequence of ``batch`` (one forward pass)."""
    with autocast(runtime):
        logits = model(input_ids=batch).logits
    logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses.view(targets.shape).sum(dim=1)


def evaluate(
    model: torch.nn.Module, sequences: Sequences, runtime: Runtime, *, batch_size: int
) -> Evaluation:
    """The token-weighted mean cross-entropy over ``sequences``, split over the processes.

    Every process runs the same number of forward passes (FSDP needs it): a process short of
    sequences runs extra ones with weight 0.
    """
    world, rank = runtime.launch.world_size, runtime.launch.rank
    mine = np.arange(rank, len(sequences), world)
    per_rank = math.ceil(len(sequences) / world)
    weights = np.concatenate([np.ones(len(mine)), np.zeros(per_rank - len(mine))])
    mine = np.concatenate([mine, np.zeros(per_rank - len(mine), dtype=mine.dtype)])
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    predicted = sequences.seq_len - 1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, batch_size):
            batch = torch.from_numpy(sequences.batch(mine[start : start + batch_size])).to(
                runtime.device
            )
            weight = torch.from_numpy(weights[start : start + batch_size]).to(runtime.device)
            per_sequence = sequence_losses(model, batch, runtime)
            totals[0] += (per_sequence.double() * weight).sum()
            totals[1] += predicted * weight.sum()
    model.train(was_training)
    reshard(model, runtime)
    all_reduce_sum(totals, runtime)
    loss, tokens = totals[0].item(), int(totals[1].item())
    if not math.isfinite(loss):
        raise DivergedError(f"validation loss is {loss}: the model's outputs are not finite")
    return Evaluation(loss / tokens, tokens)


def optimizer_implementation(runtime: Runtime) -> dict[str, bool]:
    """AdamW's kernels: the fused one on GPUs and CPUs (what ``transformers.Trainer`` picks
    too); the default (foreach over DTensors) under FSDP2."""
    return {} if runtime.parallelism == "fsdp" else {"fused": True}


def train(
    model: torch.nn.Module,
    sequences: Sequences,
    plan: StepPlan,
    config: TrainingConfig,
    runtime: Runtime,
) -> TrainingResult:
    """Runs ``plan.total_steps`` optimizer steps of AdamW with the configured schedule."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        **optimizer_implementation(runtime),
    )

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps=plan.total_steps, warmup_steps=config.warmup_steps,
            schedule=config.lr_schedule, min_ratio=config.min_lr_ratio,
        )  # fmt: skip

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    torch.manual_seed(config.seed)  # dropout draws the same whatever the set-up drew
    model.train()
    predicted = sequences.seq_len - 1
    world = runtime.launch.world_size
    loss_total, last_window, step_losses = 0.0, [], []
    samples = step = epoch = 0
    learning_rate = config.learning_rate
    started, cpu_started = time.perf_counter(), time.process_time()
    step_ends: list[float] = []
    groups: list = []
    while step < plan.total_steps:
        if not groups:
            micro = rank_micro_batches(
                plan, seed=config.seed, epoch=epoch, rank=runtime.launch.rank
            )
            groups = step_groups(micro, config.gradient_accumulation)
            epoch += 1
        group = groups.pop(0)
        group_tokens = sum(len(positions) for positions in group) * predicted
        stats = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        for index, positions in enumerate(group):
            batch = torch.from_numpy(sequences.batch(positions)).to(
                runtime.device, non_blocking=True
            )
            with accumulation_context(model, runtime, sync=index == len(group) - 1):
                loss = loss_of(model, batch, runtime)
                tokens = len(positions) * predicted
                (loss * (tokens / group_tokens)).backward()
            stats[0] += loss.detach().double() * tokens
            samples += len(positions) * world
        stats[1] = grad_norm(model, config.max_grad_norm).double()
        all_reduce_sum(stats, runtime)
        step_loss = stats[0].item() / (group_tokens * world)
        norm = stats[1].item() / world
        learning_rate = optimizer.param_groups[0]["lr"]
        for what, value in (("training loss", step_loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                raise DivergedError(
                    f"the {what} became {value} at step {step + 1} of {plan.total_steps} (learning rate "
                    f"{learning_rate:.3g}): training diverged; lower learning_rate or raise warmup_steps"
                )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_ends.append(time.perf_counter())
        step += 1
        loss_total += step_loss
        step_losses.append(step_loss)
        last_window = (last_window + [step_loss])[-config.log_every :]
        if runtime.launch.is_main and (step % config.log_every == 0 or step == plan.total_steps):
            elapsed = time.perf_counter() - started
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  grad-norm %.3g  %.0f tokens/s",
                step, plan.total_steps, step_loss, learning_rate, norm,
                samples * sequences.seq_len / max(elapsed, 1e-9),
            )  # fmt: skip
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    durations = np.diff(np.array([started, *step_ends]))
    return TrainingResult(
        steps=step,
        num_samples=samples,
        num_tokens=samples * sequences.seq_len,
        train_loss=loss_total / max(step, 1),
        train_loss_last=sum(last_window) / max(len(last_window), 1),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        step_seconds_median=float(np.median(durations)) if len(durations) else 0.0,
        learning_rate_last=float(learning_rate),
        step_losses=tuple(step_losses),
    )
