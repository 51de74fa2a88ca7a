"""The federation configuration: one YAML file per federation, validated on load.

Errors name the file and the field (``federation.yaml: facilities[1].name: ...``). Loading
needs no torch and no network, so the DAG file that builds a federation's DAG stays cheap to
parse; what needs Airflow (the connections) is checked when a round starts.

The file is the config author's: it decides everything that runs or is read at a facility and
on the worker (docs/security.md, R1). Everything that can be checked is checked on load, so a
bad value is an import error of the DAG before any round is paid for (R6): path characters,
strategy options, the training command's placeholders. ``${XFFL_NAME}`` in a value is
replaced by that environment variable, in the file only, and no error prints the value (R3).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from xffl_airflow.federation.config_env import expand_env, hide_values
from xffl_airflow.federation.config_facility import FacilityConfig
from xffl_airflow.federation.config_sections import (
    ADAPTER_STRATEGIES,
    AggregationConfig,
    ConvergenceConfig,
    PrivacyConfig,
    ReleaseConfig,
    RetryConfig,
    TrainingConfig,
)
from xffl_airflow.federation.errors import ConfigError
from xffl_airflow.federation.knobs import (
    DEFAULT_OVERRIDABLE,
    Knob,
    check_overridable,
    current_value,
    knobs_of,
)
from xffl_airflow.federation.names import CAMPAIGN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationConfig(_Strict):
    campaign: str
    storage: str
    base_model: str
    facilities: list[FacilityConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    convergence: ConvergenceConfig = Field(default_factory=ConvergenceConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    #: Absent: no release step (the campaign's global models stay in its storage).
    release: ReleaseConfig | None = None
    #: Absent: no differential privacy (docs/privacy.md).
    privacy: PrivacyConfig | None = None
    quorum: int | None = Field(default=None, ge=1)
    schedule: str | None = None
    warm_start: bool = False
    #: With ``warm_start``: a campaign that failed or was abandoned before its convergence rule
    #: stopped it may be the source too (its newest round with a manifest). Off: never.
    warm_start_unfinished: bool = False
    description: str = ""
    #: The knobs a run may change (docs/security.md, R2); absent: DEFAULT_OVERRIDABLE.
    overridable: list[str] | None = None

    @field_validator("campaign")
    @classmethod
    def _campaign(cls, value: str) -> str:
        if not re.fullmatch(CAMPAIGN, value):
            raise ValueError(f"a campaign name is 1-64 of a-z, 0-9, _ and -, starting with a letter; got {value!r}")
        return value

    @field_validator("overridable")
    @classmethod
    def _overridable(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_overridable(value)

    @field_validator("storage", "base_model")
    @classmethod
    def _local_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        names = [f.name for f in self.facilities]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"facilities: repeated name(s) {repeated}")
        if self.quorum is not None and self.quorum > len(self.facilities):
            raise ValueError(f"quorum: {self.quorum} is more than the {len(self.facilities)} facilities")
        places = [(f.connection_id, f.workdir) for f in self.facilities]
        shared = sorted({f.name for f in self.facilities if places.count((f.connection_id, f.workdir)) > 1})
        if shared:
            raise ValueError(
                f"facilities: {', '.join(shared)} share one connection and workdir; their rounds would "
                "overwrite each other's models (give each its own workdir)"
            )
        adapters = self.aggregation.strategy in ADAPTER_STRATEGIES
        if adapters and self.training.peft is None:
            raise ValueError(
                f"aggregation.strategy: {self.aggregation.strategy} aggregates LoRA adapters; set training.peft"
            )
        if self.training.peft is not None and not adapters:
            raise ValueError(
                f"aggregation.strategy: with training.peft the rounds move adapters; use one of "
                f"{', '.join(ADAPTER_STRATEGIES)}, not {self.aggregation.strategy}"
            )
        share = self.aggregation.max_weight_share
        # read as the decimal written (0.6 is 3/5), as the aggregation does
        if share is not None and Fraction(str(share)) * self.required_facilities < 1:
            raise ValueError(
                f"aggregation.max_weight_share: {share:g} cannot hold when only {self.required_facilities} "
                f"facilities (the quorum) deliver: the shares would add up to {share * self.required_facilities:g} < 1"
            )
        self._check_ranks()
        self._check_privacy()
        if self.release is not None and self.training.command is not None:
            raise ValueError(
                "release: the final evaluation runs the training task's own evaluation "
                "(python -m xffl_tasks.evaluate), which a custom training.command does not say how to run"
            )
        if self.training.command is not None and self.overridable:
            opened = [p for p in self.overridable if p.startswith("training.")]
            if opened:
                raise ValueError(
                    f"overridable: {opened[0]} has no effect with training.command set (the command "
                    "takes no hyperparameters); open only convergence settings"
                )
        return self

    @property
    def overridable_paths(self) -> list[str]:
        if self.overridable is not None:
            return list(self.overridable)
        if self.training.command is not None:
            return [p for p in DEFAULT_OVERRIDABLE if not p.startswith("training.")]
        return list(DEFAULT_OVERRIDABLE)

    @property
    def knobs(self) -> list[Knob]:
        """The run parameters this config opens, typed, with their ranges."""
        return knobs_of(self.overridable_paths)

    def knob_defaults(self) -> dict[str, Any]:
        """Each opened knob's value in this config, by run parameter (the form's defaults)."""
        sections = {"training": self.training.hyperparameters, "convergence": self.convergence.model_dump()}
        return {knob.param: current_value(knob, sections) for knob in self.knobs}

    def _check_ranks(self) -> None:
        peft = self.training.peft
        tuned = [f.name for f in self.facilities if f.peft is not None]
        if peft is None:
            if tuned:
                raise ValueError(f"facilities: {', '.join(tuned)} set peft, but training.peft is not set")
            return
        from xffl_tasks.aggregate.errors import AggregationError
        from xffl_tasks.aggregate.lora_options import check_ranks

        try:
            check_ranks(self.aggregation.strategy, {f.name: self.lora_rank(f.name) for f in self.facilities})
        except AggregationError as error:
            raise ValueError(f"facilities[].peft: {error}") from None

    def _check_privacy(self) -> None:
        if self.privacy is None:
            if any(f.epsilon_budget is not None for f in self.facilities):
                raise ValueError("facilities[].epsilon_budget: only with a privacy section")
            return
        if self.training.command is not None:
            raise ValueError("privacy: DP-SGD is the training task's own; a custom training.command does not run it")
        from xffl_tasks.train.config import ConfigError as TrainingError
        from xffl_tasks.train.config import TrainingConfig as Task
        from xffl_tasks.train.dp_options import check_dp_options

        try:  # the training task's own rules: e.g. no FSDP2, no gradient checkpointing with DP
            check_dp_options(Task(**{**self.training.hyperparameters, **self.privacy.training_flags()}))
        except (TrainingError, TypeError, ValueError) as error:
            raise ValueError(f"privacy: {error}") from None

    def epsilon_budget(self, facility: str) -> float | None:
        own = self.facility(facility).epsilon_budget
        return own if own is not None else (self.privacy.epsilon_budget if self.privacy else None)

    def lora_rank(self, facility: str) -> tuple[int, float]:
        """``(r, alpha)`` of ``facility``'s adapters: its own ``peft``, else ``training.peft``'s."""
        own, peft = self.facility(facility).peft, self.training.peft
        if own is None:
            return peft.r, float(peft.alpha)
        return own.r, float(own.alpha if own.alpha is not None else peft.alpha)

    @property
    def warnings(self) -> list[str]:
        """What the config leaves open to a hostile facility (logged when the DAG is built,
        recorded in each round's manifest, shown in the campaign view)."""
        found = []
        unbounded = [f.name for f in self.facilities if f.max_samples is None]
        if self.aggregation.max_weight_share is None and unbounded:
            found.append(
                f"no bound on the weight a facility can claim: {', '.join(unbounded)} may report any "
                "num_samples (up to 10^12) and take nearly all the weight; declare facilities[].max_samples "
                "or aggregation.max_weight_share"
            )
        return found

    @property
    def releases_root(self) -> str:
        return (self.release.root if self.release and self.release.root else None) or f"{self.storage.rstrip('/')}/_releases"

    @property
    def required_facilities(self) -> int:
        return self.quorum if self.quorum is not None else len(self.facilities)

    def facility(self, name: str) -> FacilityConfig:
        for facility in self.facilities:
            if facility.name == name:
                return facility
        raise KeyError(f"no facility {name!r} in campaign {self.campaign!r}")


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in ("function-after", "function-before") and not str(part).startswith(("function-", "literal")):
            text += f".{part}" if text else str(part)
    return text


def _format(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "required field is missing"
        where = _location(item["loc"])
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "<config>") -> FederationConfig:
    """Validates already-parsed YAML/JSON data; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format(error, source)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, without echoing the file's lines."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FederationConfig:
    """Reads and validates a federation config file.

    ``overrides`` are a run's knob values (``{"training": {"max_steps": 10}}``), already
    accepted by :func:`xffl_airflow.federation.knobs.accept_run_conf`: they are merged after
    ``${XFFL_NAME}`` expansion and are never expanded themselves.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the federation config: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    used: dict[str, str] = {}
    try:
        data = expand_env(data, dict(os.environ), used=used)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if overrides:
        data = merge(data if isinstance(data, dict) else {}, overrides)
    try:
        return parse_config(data, source=str(path))
    except ConfigError as error:
        raise ConfigError(hide_values(str(error), used)) from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges ``overrides`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_sha256(config: FederationConfig) -> str:
    """A stable hash of the validated configuration (what the manifest records)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
