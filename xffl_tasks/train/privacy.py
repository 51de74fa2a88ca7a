"""DP-SGD at the facility (``--dp-mode dp-sgd``), with Opacus: per-sample gradients by its
hooks (``GradSampleModule``), per-sample clipping and Gaussian noise by its optimizer
(``DPOptimizer``; ``DistributedDPOptimizer`` with its ``DifferentiallyPrivateDistributedDataParallel``
under DDP), Poisson sampling by its ``DPDataLoader``, the step count by its accountant's hook.

One logical batch a step: every training sequence joins it with probability ``q``
(:mod:`xffl_tasks.train.dp_options`). Every process draws the same global Poisson batch (the
same secret sampling seed) and keeps its round-robin share, so the processes take the same
number of steps whatever the draw (Opacus's distributed sampler skips a process's empty share,
and the processes would fall out of step). A share is cut into physical micro-batches of at
most ``batch_size`` sequences: the per-sample gradients of a logical batch are clipped and
summed micro-batch by micro-batch (Opacus's ``signal_skip_step``, as its BatchMemoryManager
does), then the noise is added once, the sum divided by the expected batch size ``q N``, and
AdamW steps. A process with an empty share runs one data-free sequence with its loss times
zero (a zero per-sample gradient), so that it still meets the others in the reduction.

Secret randomness: the Poisson draws and the noise come from generators seeded with 64 bits of
``os.urandom`` (the config's ``seed``, written to metrics.json, would let anyone replay the
noise and undo the guarantee); ``XFFL_DP_SEED`` in the environment, a secret the facility keeps,
replaces them and makes the run bit-reproducible on CPU (determinism.py's conditions).

What leaves the facility: the model (or adapter), and the metrics of :meth:`PrivateRun.release`
(``dp_options.release_metrics``: no training loss, counts from the expected batch). The job's
log leaves too (the Airflow side reads it), so the steps are logged without their loss, batch
size or tokens per second.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from xffl_tasks.data.tokens import Sequences
from xffl_tasks.privacy.accountant import DpRound, PrivacyError, epsilon, noise_for_epsilon
from xffl_tasks.train import distributed
from xffl_tasks.train.config import ConfigError, TrainingConfig
from xffl_tasks.train.distributed import Runtime, all_reduce_sum, loss_of
from xffl_tasks.train.dp_options import (
    NUM_SAMPLES_RULE,
    PrivacyPlan,
    plan_privacy,
    release_metrics,
)
from xffl_tasks.train.loop import DivergedError, TrainingResult, optimizer_implementation
from xffl_tasks.train.schedule import StepPlan, lr_factor

log = logging.getLogger(__name__)
SEED_VARIABLE = "XFFL_DP_SEED"


def secret_seeds(environ: dict[str, str]) -> tuple[int, int, str]:
    """``(sampling seed, noise seed, source)``: from ``XFFL_DP_SEED`` (a whole number) or
    ``os.urandom``; the same on every process only with the variable (see ``_shared_seed``)."""
    text = environ.get(SEED_VARIABLE)
    if text is None:
        return int.from_bytes(os.urandom(8), "little"), int.from_bytes(os.urandom(8), "little"), "urandom"
    if not text.isdigit() or len(text) > 19:
        raise ConfigError(f"{SEED_VARIABLE}: expected a whole number of at most 19 digits")
    seed = int(text)
    return seed, (seed * 0x9E3779B97F4A7C15 + 1) % 2**63, "environment"


def _shared_seed(seed: int, runtime: Runtime) -> int:
    """Rank 0's ``seed`` on every process (the sampling must be the same everywhere)."""
    if runtime.launch.world_size == 1:
        return seed
    import torch.distributed as dist

    value = torch.tensor([seed % 2**63], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value.item())


class _Indexed(torch.utils.data.Dataset):
    """The training sequences, one ``(token ids,)`` tuple each, for Opacus's data loader."""

    def __init__(self, sequences: Sequences):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (torch.from_numpy(self.sequences.batch(np.array([index]))[0]),)


class PrivateRun:
    """One DP-SGD run: its plan (sample rate, delta), its noise multiplier, and after training
    the steps taken; built by :meth:`prepare` before the process group starts."""

    def __init__(
        self, config: TrainingConfig, plan: PrivacyPlan, noise_multiplier: float,
        seeds: tuple[int, int, str],
    ):  # fmt: skip
        self.config, self.plan, self.noise_multiplier = config, plan, noise_multiplier
        self.sampling_seed, self.noise_seed, self.seed_source = seeds
        self.steps = 0  # taken
        self._counter: Any = None

    @classmethod
    def prepare(
        cls, config: TrainingConfig, *, num_sequences: int, step_plan: StepPlan, world_size: int,
        environ: dict[str, str],
    ) -> PrivateRun:  # fmt: skip
        """Checks the run's privacy parameters (ConfigError naming the field) and draws its
        secret seeds; with ``dp_target_epsilon``, the noise multiplier that reaches it after the
        planned steps (Opacus's ``get_noise_multiplier`` with the run's accountant)."""
        seeds = secret_seeds(environ)
        plan = plan_privacy(config, num_sequences=num_sequences, world_size=world_size)
        noise = config.dp_noise_multiplier
        if noise is None:
            try:
                noise = noise_for_epsilon(
                    config.dp_target_epsilon, sample_rate=plan.sample_rate,
                    steps=step_plan.total_steps, delta=plan.delta, accountant=config.dp_accountant,
                )  # fmt: skip
            except PrivacyError as error:
                raise ConfigError(f"--dp-target-epsilon: {error.problem}") from None
            log.info(
                "dp-sgd: noise multiplier %.4f reaches epsilon %g at delta %.3g after %d steps at sample rate %.5f",
                noise, config.dp_target_epsilon, plan.delta, step_plan.total_steps, plan.sample_rate,
            )  # fmt: skip
        return cls(config, plan, float(noise), seeds)

    @staticmethod
    def runtime(runtime: Runtime) -> Runtime:
        """DP runs replicate (DDP), never shard, and compute in fp32 (``auto`` resolves so)."""
        parallelism = "ddp" if runtime.parallelism == "fsdp" else runtime.parallelism
        return dataclasses.replace(runtime, parallelism=parallelism, precision="fp32")

    def build_model(
        self, source: Any, config: TrainingConfig, runtime: Runtime, adapter: Any = None
    ) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(Opacus's GradSampleModule, the plain model inside it)``: the model loaded as for
        one process, under Opacus's DDP wrapper when there are several, then its hooks."""
        from opacus import GradSampleModule
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
        from opacus.validators import ModuleValidator

        single = dataclasses.replace(runtime, parallelism="none")
        _, plain = distributed.build_model(source, config, single, adapter)
        errors = ModuleValidator.validate(plain.train(), strict=False)
        if errors:
            raise ConfigError(f"--dp-mode dp-sgd: Opacus cannot train this model: {errors[0]}")
        wrapped = DPDDP(plain) if runtime.parallelism == "ddp" else plain
        model = GradSampleModule(wrapped, batch_first=True, loss_reduction="mean")
        model.forbid_grad_accumulation()  # Poisson batches: one clipped sum per logical batch
        return model, plain

    def _optimizer_for(self, model: torch.nn.Module, runtime: Runtime, noise_seed: int) -> Any:
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        config = self.config
        inner = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
            **optimizer_implementation(runtime),
        )
        kind = DistributedDPOptimizer if runtime.parallelism == "ddp" else DPOptimizer
        generator = torch.Generator(device=runtime.device).manual_seed(noise_seed)
        optimizer = kind(
            inner,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=config.dp_max_grad_norm,
            # per process: DistributedDPOptimizer averages the processes' sums afterwards
            expected_batch_size=self.plan.expected_batch / runtime.launch.world_size,
            loss_reduction="mean",
            generator=generator,
        )
        self._counter = RDPAccountant()  # counts the noised steps (Opacus's own step hook)
        optimizer.attach_step_hook(
            self._counter.get_optimizer_hook_fn(sample_rate=self.plan.sample_rate)
        )
        return optimizer

    def train(
        self,
        model: torch.nn.Module,
        sequences: Sequences,
        step_plan: StepPlan,
        config: TrainingConfig,
        runtime: Runtime,
    ) -> TrainingResult:
        """``step_plan.total_steps`` DP-SGD steps of AdamW with the configured schedule."""
        from opacus.data_loader import DPDataLoader

        # its warnings ("first batch is empty": an empty Poisson draw) are expected here
        logging.getLogger("opacus.data_loader").setLevel(logging.ERROR)
        sampling_seed = _shared_seed(self.sampling_seed, runtime)
        optimizer = self._optimizer_for(model, runtime, self.noise_seed)
        loader = DPDataLoader(
            _Indexed(sequences),
            sample_rate=self.plan.sample_rate,
            generator=torch.Generator().manual_seed(sampling_seed),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.original_optimizer,
            lambda step: lr_factor(
                step, total_steps=step_plan.total_steps, warmup_steps=config.warmup_steps,
                schedule=config.lr_schedule, min_ratio=config.min_lr_ratio,
            ),
        )  # fmt: skip
        torch.manual_seed(config.seed)  # dropout draws the same whatever the set-up drew
        model.train()
        rank, world = runtime.launch.rank, runtime.launch.world_size
        dummy = torch.zeros((1, sequences.seq_len), dtype=torch.int64, device=runtime.device)
        batches = iter(loader)
        losses: list[float] = []
        samples = 0
        learning_rate = config.learning_rate
        started, cpu_started = time.perf_counter(), time.process_time()
        step_ends: list[float] = []
        while self.steps < step_plan.total_steps:
            try:
                (batch,) = next(batches)
            except StopIteration:  # the loader's "epoch" of 1/q draws is over: draw on
                batches = iter(loader)
                (batch,) = next(batches)
            samples += len(batch)
            mine = batch[rank::world].to(runtime.device)
            chunks = list(torch.split(mine, config.batch_size)) if len(mine) else []
            stats = torch.zeros(2, dtype=torch.float64, device=runtime.device)
            for index, chunk in enumerate(chunks or [dummy]):
                if index < len(chunks) - 1:
                    optimizer.signal_skip_step(do_skip=True)  # clip and sum, no step yet
                loss = loss_of(model, chunk, runtime)
                with warnings.catch_warnings():  # the token ids have no gradient: Opacus needs none
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    (loss if chunks else loss * 0.0).backward()
                if chunks:
                    stats[0] += loss.detach().double() * len(chunk)
                    stats[1] += len(chunk)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            all_reduce_sum(stats, runtime)
            learning_rate = optimizer.original_optimizer.param_groups[0]["lr"]
            scheduler.step()
            self.steps += 1
            step_ends.append(time.perf_counter())
            if stats[1].item() > 0:
                step_loss = stats[0].item() / stats[1].item()
                if not math.isfinite(step_loss):
                    raise DivergedError(
                        f"the training loss became {step_loss} at step {self.steps} of "
                        f"{step_plan.total_steps} (learning rate {learning_rate:.3g}): training "
                        "diverged; lower learning_rate or raise dp_max_grad_norm"
                    )
                losses.append(step_loss)
            if runtime.launch.is_main and (
                self.steps % config.log_every == 0 or self.steps == step_plan.total_steps
            ):  # the log leaves the facility: no loss, batch size or tokens/s (see above)
                log.info("step %d/%d  lr %.3g", self.steps, step_plan.total_steps, learning_rate)
        self._check_counted()
        seconds = time.perf_counter() - started
        durations = np.diff(np.array([started, *step_ends]))
        window = losses[-config.log_every :]
        return TrainingResult(
            steps=self.steps,
            num_samples=samples,
            num_tokens=samples * sequences.seq_len,
            train_loss=sum(losses) / max(len(losses), 1),
            train_loss_last=sum(window) / max(len(window), 1),
            seconds=seconds,
            cpu_seconds=time.process_time() - cpu_started,
            step_seconds_median=float(np.median(durations)) if len(durations) else 0.0,
            learning_rate_last=float(learning_rate),
            step_losses=tuple(losses),
        )

    def _check_counted(self) -> None:
        """The accountant's hook counted every noised step, at this run's parameters."""
        counted = sum(steps for _, _, steps in self._counter.history)
        if counted != self.steps or any(
            (n, q) != (self.noise_multiplier, self.plan.sample_rate)
            for n, q, _ in self._counter.history
        ):
            raise DivergedError(
                f"dp-sgd: Opacus's accountant counted {self._counter.history}, the loop "
                f"{self.steps} steps at noise {self.noise_multiplier}, sample rate {self.plan.sample_rate}"
            )

    def release(self, metrics: dict[str, Any], *, seq_len: int) -> dict[str, Any]:
        """What of this run's ``metrics`` leaves the facility (``dp_options.release_metrics``),
        then its ``privacy`` map, which names the fields left out."""
        released = release_metrics(
            metrics, plan=self.plan, steps=self.steps, seq_len=seq_len,
            withhold_validation=self.config.dp_withhold_validation,
        )  # fmt: skip
        withheld = [name for name in metrics if name not in released]
        return {**released, "privacy": self.metrics(withheld)}

    def metrics(self, withheld: list[str]) -> dict[str, Any]:
        """metrics.json ``privacy``: what the aggregation side's accountant needs, the epsilon
        this facility's accountant computes for this run alone (informational), and what the
        metrics report instead of the draws: ``num_samples_rule`` ``expected``, whether the
        validation losses are reported, the ``withheld`` fields."""
        value = epsilon(
            [DpRound(self.plan.sample_rate, self.noise_multiplier, self.steps)],
            delta=self.plan.delta,
            accountant=self.config.dp_accountant,
        )
        return {
            "mode": "dp-sgd",
            "sample_rate": self.plan.sample_rate,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.dp_max_grad_norm,
            "delta": self.plan.delta,
            "accountant": self.config.dp_accountant,
            "poisson": True,
            "num_train_sequences": self.plan.num_sequences,
            "world_size": self.plan.world_size,
            "expected_batch_size": self.plan.expected_batch,
            "target_epsilon": self.config.dp_target_epsilon,
            "epsilon": value if math.isfinite(value) else None,
            "secret_seed": self.seed_source,
            "num_samples_rule": NUM_SAMPLES_RULE,
            "validation_losses_reported": not self.config.dp_withhold_validation,
            "withheld": withheld,
        }
