"""The sections of a federation config besides its facilities: training (and LoRA), aggregation,
convergence, release and retries. Each validated on load, its errors naming the field."""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The training command's placeholders: exactly these names, no attribute, index or format.
PLACEHOLDERS = ("python", "model", "data", "out")
# The aggregation task's strategies (xffl_tasks.aggregate); a test keeps the two in step.
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "trimmed-mean", "median")
# The strategies for LoRA adapters (training.peft; xffl_tasks.aggregate.lora_options).
ADAPTER_STRATEGIES = ("lora-fedavg", "lora-svd", "lora-frozen-a", "lora-stacked")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LAUNCHERS = ("none", "srun", "torchrun")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FacilityPeft(_Strict):
    """A facility's own LoRA rank and alpha (``facilities[].peft``): with ``lora-stacked`` only,
    whose exact update holds adapters of any mix of ranks."""

    r: int = Field(ge=1, le=4096)
    alpha: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class PeftConfig(_Strict):
    """Parameter-efficient fine-tuning: the base model stays frozen (pushed once per facility),
    each round trains, moves and aggregates only a LoRA adapter (docs/training.md)."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.]{1,128}", name):
                raise ValueError(f"{name[:40]!r} is not a module name (letters, digits, _ and .)")
        if len(set(value)) != len(value):
            raise ValueError("repeated module names")
        return value


class TrainingConfig(_Strict):
    """Hyperparameters of the facility training task (``python -m xffl_tasks.train``).

    ``command``, when set, replaces the training command: a shell template with the
    placeholders ``{python}``, ``{model}``, ``{data}`` and ``{out}`` (already quoted).
    ``peft`` (absent: full fine-tuning) trains a LoRA adapter instead of the whole model.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    command: str | None = None
    peft: PeftConfig | None = None

    @model_validator(mode="after")
    def _known_placeholders(self) -> TrainingConfig:
        if self.command is not None:
            check_command_template(self.command)
            if self.peft is not None:
                raise ValueError("peft: not with a custom command (the round passes the base model and the adapter itself)")
        for key, value in self.hyperparameters.items():
            if key.startswith("lora_") or key in ("adapter", "peft"):
                raise ValueError(f"{key}: LoRA is set in training.peft (method, r, alpha, dropout, target_modules)")
            if key.startswith("dp_"):
                raise ValueError(f"{key}: differential privacy is set in the config's privacy section, never in training")
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"{key}: hyperparameter names are lower_snake_case")
            if not isinstance(value, (int, float, str, bool)) or value is None:
                raise ValueError(f"{key}: must be a number, string or boolean, got {type(value).__name__}")
        if self.command is None:
            # the training task's own field table (no torch): a misspelt or ill-typed
            # hyperparameter fails here, before any job is submitted
            from xffl_airflow.training_job import TrainingJobError, hyperparameter_arguments

            try:
                hyperparameter_arguments(self.hyperparameters)
            except (TrainingJobError, ValueError) as error:
                raise ValueError(str(error).removeprefix("hyperparameters: ")) from None
        return self

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def check_command_template(command: str) -> str:
    """The training command template: one line, only ``{python}`` ``{model}`` ``{data}``
    ``{out}`` as placeholders (no attribute, index, conversion or format spec)."""
    if "\n" in command or "\0" in command:
        raise ValueError("command: must be a single line without NUL characters")
    try:
        fields = [parsed for parsed in string.Formatter().parse(command) if parsed[1] is not None]
    except ValueError as error:
        raise ValueError(f"command: not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in fields:
        if name not in PLACEHOLDERS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"command: placeholder {shown[:40]!r} is not one of {{python}} {{model}} {{data}} {{out}} "
                "(plain, without attribute, index or format)"
            )
    return command


class UpdateNormBound(_Strict):
    """A client whose update norm is above ``k`` times the median client's is clipped to that
    limit or refused (``action``), for every strategy, adapters included."""

    k: float = Field(ge=1, le=1e6, allow_inf_nan=False)
    action: Literal["clip", "refuse"] = "clip"


class AggregationConfig(_Strict):
    """How the round's models are combined. ``max_weight_share`` (optional) caps the share of
    any one facility in the weighted average, whatever the sample counts it reports;
    ``update_norm_bound`` (optional) bounds each client's update against the median's."""

    strategy: str = "fedavg"
    options: dict[str, float] = Field(default_factory=dict)
    max_weight_share: float | None = Field(default=None, gt=0, le=1)
    update_norm_bound: UpdateNormBound | None = None

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        from xffl_tasks.aggregate.lora_options import RENAMED_STRATEGIES

        if value in RENAMED_STRATEGIES:
            raise ValueError(RENAMED_STRATEGIES[value])
        if value not in STRATEGIES + ADAPTER_STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; one of {', '.join(STRATEGIES + ADAPTER_STRATEGIES)}")
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        # the strategies' own option table (torch-free): names, finite, in range
        from xffl_tasks.aggregate.errors import AggregationError
        from xffl_tasks.aggregate.strategy_options import check_options

        strategy = info.data.get("strategy")
        if strategy is None:  # refused above
            return value
        try:
            if strategy in ADAPTER_STRATEGIES:
                from xffl_tasks.aggregate.lora_options import check_adapter_options

                check_adapter_options(strategy, dict(value))
                return dict(value)
            return check_options(strategy, dict(value))
        except AggregationError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _bounds(self) -> AggregationConfig:
        if self.strategy == "lora-stacked" and self.update_norm_bound is not None:
            raise ValueError("update_norm_bound: not offered by lora-stacked (use max_weight_share and facilities[].max_samples)")
        return self


class ConvergenceConfig(_Strict):
    """When a campaign stops: after ``max_rounds`` rounds; or when the sample-weighted
    validation loss of the global model improved by less than ``min_improvement`` for
    ``patience`` rounds in a row; or when the global update norm falls below
    ``min_update_norm``."""

    max_rounds: int = Field(default=3, ge=1, le=10000)
    min_improvement: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    patience: int = Field(default=1, ge=1)
    min_update_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class ReleaseConfig(_Strict):
    """What happens when a campaign ends: every facility evaluates its last global model (and the
    last release) on its validation split; the best round's model is released when it beats the
    last release's weighted validation loss by ``min_improvement`` (and, with ``approval``, once
    a person approves it in the UI within ``approval_timeout_h``). Releases go to
    ``<root>/<campaign of the config>/<n>/`` (``root`` defaults to ``<storage>/_releases``)."""

    min_improvement: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)
    approval: bool = False
    approval_timeout_h: float = Field(default=72.0, gt=0, le=24 * 365, allow_inf_nan=False)
    root: str | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return value


class PrivacyConfig(_Strict):
    """Record-level differential privacy at every facility (DP-SGD, docs/privacy.md): the config
    author's, never a run's. ``noise_multiplier`` (every round's) or ``target_epsilon`` (each
    round's run calibrated to it by the facility); ``epsilon_budget``: what a facility's data may
    spend over every round of a campaign and of the campaigns warm-started from it
    (``facilities[].epsilon_budget`` overrides it); ``withhold_validation``: facilities report
    no validation losses either (then ``convergence.min_improvement`` cannot stop a campaign)."""

    mode: Literal["dp-sgd"] = "dp-sgd"
    noise_multiplier: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    target_epsilon: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    delta: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False)
    accountant: Literal["rdp", "prv"] = "rdp"
    epsilon_budget: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)
    withhold_validation: bool = False

    @model_validator(mode="after")
    def _one_noise(self) -> PrivacyConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self

    def training_flags(self) -> dict[str, Any]:
        """The training task's dp_* hyperparameters for this setting."""
        flags: dict[str, Any] = {"dp_mode": self.mode, "dp_max_grad_norm": self.max_grad_norm,
                                 "dp_accountant": self.accountant}  # fmt: skip
        if self.noise_multiplier is not None:
            flags["dp_noise_multiplier"] = self.noise_multiplier
        else:
            flags["dp_target_epsilon"] = self.target_epsilon
        if self.delta is not None:
            flags["dp_delta"] = self.delta
        if self.withhold_validation:
            flags["dp_withhold_validation"] = True
        return flags


class RetryConfig(_Strict):
    """Retries of every remote step (push, train, pull)."""

    retries: int = Field(default=2, ge=0, le=20)
    retry_delay_s: float = Field(default=30.0, ge=0, le=86400)
    max_retry_delay_s: float = Field(default=600.0, ge=0, le=86400)
    train_timeout_h: float = Field(default=48.0, gt=0, le=24 * 365)


