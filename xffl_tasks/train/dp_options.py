"""The differential-privacy options of the training task: their rules across fields and the
privacy arithmetic of one run, as pure functions (no torch, no Opacus: the Airflow side may
check a federation's hyperparameters with them). See docs/privacy.md.

``dp_mode dp-sgd`` needs exactly one of ``dp_noise_multiplier`` and ``dp_target_epsilon``.
Refused combinations (at argument validation, exit 2, naming both sides):

- ``parallelism fsdp``: Opacus clips FSDP2 models only by ghost clipping, which needs its own
  loss wrapper and a second backward pass, and refuses tied parameters (the tiny model and
  many LLMs tie the embeddings); with ``parallelism auto`` a DP run takes DDP instead;
- ``gradient_checkpointing``: under the recomputed forward pass Opacus's hooks leave
  parameters without per-sample gradients (its optimizer stops: "Per sample gradient is not
  initialized");
- ``precision bf16``: not proven (CPU bf16 autocast under the per-sample hooks).

The run's sample rate is ``q = batch_size x gradient_accumulation x processes / N`` (N the
facility's training sequences): each sequence joins a step's logical batch with probability
``q`` (Poisson sampling), expected size ``q N``; ``q > 1`` is refused. The default delta is
``1 / (10 N)``; a given ``dp_delta`` must stay below ``1 / N``.

What a dp-sgd run's metrics.json carries (:func:`release_metrics`): nothing computed from the
training records other than through the DP mechanism. The training losses are left out,
``num_samples`` (and ``num_tokens``, ``epochs``, ``tokens_per_second``) come from the expected
batch ``round(q N)`` times the steps, not from the sequences drawn; the held-out validation
split's losses stay unless ``dp_withhold_validation``; N is treated as public.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xffl_tasks.train.config import FIELDS_BY_NAME, ConfigError, TrainingConfig

DP_SGD = "dp-sgd"
#: The default delta is 1 / (DELTA_DIVISOR x N), N the facility's training sequences.
DELTA_DIVISOR = 10
#: dp_* fields that only a dp-sgd run may set (to a value other than their default).
DP_ONLY = (
    "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_max_grad_norm", "dp_accountant",
    "dp_withhold_validation",
)  # fmt: skip

# What a dp-sgd run's metrics.json may carry (docs/privacy.md, "What leaves the facility"), by
# what each field is computed from. A field in none of these is left out of a dp-sgd run's
# metrics.json: a field added to the recipe stays at the facility until it is classified here.
#: Public: the configuration, how the run ran, N and the validation split's size (treated as
#: public), the planned steps, the schedule's learning rate, the clocks (a timing side channel:
#: see docs/privacy.md), the base model's hashes and the privacy parameters.
PUBLIC_FIELDS = (
    "val_tokens", "val_sequences", "train_sequences", "steps", "seconds", "cpu_seconds",
    "step_seconds_median", "learning_rate_last", "world_size", "launcher", "device", "precision",
    "parallelism", "threads", "seed", "seq_len", "model", "data", "hyperparameters", "versions",
    "started_at", "finished_at", "total_seconds", "base_sha256", "privacy",
)  # fmt: skip
#: Counted from the sequences drawn in a plain run; from the expected batch in a dp-sgd run.
EXPECTED_FIELDS = ("num_samples", "num_tokens", "epochs", "tokens_per_second")
#: The held-out validation split's losses: kept unless ``dp_withhold_validation``.
VALIDATION_LOSSES = ("val_loss_before", "val_loss_after")
#: Computed from the drawn training batches without noise: never in a dp-sgd run's metrics.
WITHHELD_FIELDS = ("train_loss", "train_loss_last", "train_loss_curve", "train_loss_curve_every")
#: ``privacy.num_samples_rule`` of a dp-sgd run: num_samples is :func:`expected_num_samples`.
NUM_SAMPLES_RULE = "expected"


def _flag(name: str) -> str:
    return FIELDS_BY_NAME[name].flag


def check_dp_options(config: TrainingConfig) -> None:
    """Refuses an inconsistent or unsupported set of dp_* options (ConfigError naming the
    fields); a run without ``dp_mode dp-sgd`` must leave every other dp_* field at its default."""
    if config.dp_mode != DP_SGD:
        defaults = TrainingConfig()
        for name in DP_ONLY:
            if getattr(config, name) != getattr(defaults, name):
                raise ConfigError(
                    f"{_flag(name)}: only with {_flag('dp_mode')} {DP_SGD} (dp_mode is {config.dp_mode!r})"
                )
        return
    noise, target = config.dp_noise_multiplier, config.dp_target_epsilon
    if (noise is None) == (target is None):
        given = "both were given" if noise is not None else "neither was given"
        raise ConfigError(
            f"{_flag('dp_noise_multiplier')} / {_flag('dp_target_epsilon')}: {_flag('dp_mode')} "
            f"{DP_SGD} needs exactly one ({given})"
        )
    if config.parallelism == "fsdp":
        raise ConfigError(
            f"{_flag('dp_mode')} {DP_SGD} with {_flag('parallelism')} fsdp: refused (Opacus clips "
            "FSDP2 models only by ghost clipping, without tied parameters); use ddp or auto"
        )
    if config.gradient_checkpointing:
        raise ConfigError(
            f"{_flag('dp_mode')} {DP_SGD} with {_flag('gradient_checkpointing')}: refused (the "
            "recomputed forward pass leaves Opacus without per-sample gradients)"
        )
    if config.precision == "bf16":
        raise ConfigError(
            f"{_flag('dp_mode')} {DP_SGD} with {_flag('precision')} bf16: refused (not proven); "
            "use fp32 or auto"
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """One DP-SGD run's sampling: ``sample_rate`` q, ``delta``, the facility's
    ``num_sequences`` N, the ``world_size`` that shares each logical batch, and
    ``expected_batch``: q N, the expected size of a logical batch, all processes together."""

    sample_rate: float
    delta: float
    num_sequences: int
    world_size: int
    expected_batch: int


def default_delta(num_sequences: int) -> float:
    """``1 / (10 N)``: below ``1 / N``, as a meaningful (epsilon, delta) guarantee needs."""
    return 1.0 / (DELTA_DIVISOR * num_sequences)


def plan_privacy(config: TrainingConfig, *, num_sequences: int, world_size: int) -> PrivacyPlan:
    """The sample rate and delta of a dp-sgd run on ``num_sequences`` training sequences
    (ConfigError naming the field when the batch exceeds the data or delta is too large)."""
    if num_sequences < 1:
        raise ConfigError(f"data: no training sequences for {_flag('dp_mode')} {DP_SGD}")
    expected = config.batch_size * config.gradient_accumulation * world_size
    if expected > num_sequences:
        raise ConfigError(
            f"{_flag('batch_size')}: with {_flag('dp_mode')} {DP_SGD}, batch_size x "
            f"gradient_accumulation x processes = {expected} is more than the {num_sequences} "
            "training sequences (the sample rate would exceed 1)"
        )
    if config.dp_delta is None:
        delta = default_delta(num_sequences)
    elif config.dp_delta * num_sequences >= 1:
        raise ConfigError(
            f"{_flag('dp_delta')}: {config.dp_delta:g} is not below 1/N = 1/{num_sequences} "
            "(N the training sequences): such a delta allows releasing a record outright"
        )
    else:
        delta = config.dp_delta
    rate = expected / num_sequences
    if not 0 < rate <= 1 or not math.isfinite(rate):  # pragma: no cover - guarded above
        raise ConfigError(f"{_flag('batch_size')}: sample rate {rate!r} out of (0, 1]")
    return PrivacyPlan(rate, delta, num_sequences, world_size, expected)


def expected_num_samples(plan: PrivacyPlan, steps: int) -> int:
    """A dp-sgd run's ``num_samples``: ``round(q N) x steps``, the expected logical batch
    times the steps taken. Data-independent, where the sequences actually drawn (a sum of
    Binomial counts) are not."""
    return round(plan.sample_rate * plan.num_sequences) * steps


def release_metrics(
    metrics: dict[str, Any], *, plan: PrivacyPlan, steps: int, seq_len: int,
    withhold_validation: bool,
) -> dict[str, Any]:  # fmt: skip
    """What of a dp-sgd run's ``metrics`` leaves the facility, in their order: the
    ``PUBLIC_FIELDS``, the ``EXPECTED_FIELDS`` recomputed from :func:`expected_num_samples`
    (``tokens_per_second`` over the measured ``seconds``), the ``VALIDATION_LOSSES`` unless
    ``withhold_validation``; every other field (``WITHHELD_FIELDS``, unclassified ones) is
    left out."""
    samples = expected_num_samples(plan, steps)
    seconds = metrics.get("seconds") or 0.0
    expected = {
        "num_samples": samples,
        "num_tokens": samples * seq_len,
        "epochs": samples / plan.num_sequences,
        "tokens_per_second": samples * seq_len / seconds if seconds > 0 else 0.0,
    }
    kept = PUBLIC_FIELDS if withhold_validation else PUBLIC_FIELDS + VALIDATION_LOSSES
    return {
        name: expected[name] if name in expected else value
        for name, value in metrics.items()
        if name in expected or name in kept
    }
