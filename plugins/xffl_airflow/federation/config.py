"""The federation configuration: one YAML file per federation, validated on load.

Errors name the file and the field (``federation.yaml: facilities[1].name: ...``). Loading
needs no torch and no network, so the DAG file that builds a federation's DAG stays cheap to
parse; what needs Airflow (the connections) is checked when a round starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME = r"^[a-z][a-z0-9_]{0,15}$"
CAMPAIGN = r"^[a-z][a-z0-9_-]{0,63}$"
CONN_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}$"
# The aggregation task's strategies (xffl_tasks.aggregate); a test keeps the two in step.
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "trimmed-mean", "median")
LAUNCHERS = ("none", "srun", "torchrun")


class ConfigError(ValueError):
    """A federation config is unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FacilityConfig(_Strict):
    """One facility: how to reach it, where its private data is, how to run a job there."""

    name: str
    conn_id: str | None = None
    workdir: str
    data: str
    python: str = "python3"
    launcher: Literal["none", "srun", "torchrun"] = "none"
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    preamble: list[str] = Field(default_factory=list)
    sbatch: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME, value):
            raise ValueError(f"a facility name is 1-16 of a-z, 0-9 and _, starting with a letter; got {value!r}")
        return value

    @field_validator("conn_id")
    @classmethod
    def _conn_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(CONN_ID, value):
            raise ValueError(f"not a valid Airflow connection id: {value!r}")
        return value

    @field_validator("workdir", "data")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or "\n" in value or "\0" in value:
            raise ValueError(f"must be an absolute path on the facility, got {value!r}")
        if ".." in Path(value).parts:
            raise ValueError(f"must not contain '..', got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", value):
            raise ValueError(f"must be a plain command or path (letters, digits, _ . / + -), got {value!r}")
        return value

    @field_validator("preamble")
    @classmethod
    def _preamble(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line or "\0" in line:
                raise ValueError("each preamble entry must be a single line")
        return lines

    @model_validator(mode="after")
    def _sbatch(self) -> FacilityConfig:
        from xffl_airflow.slurm.options import SbatchOptions

        try:
            SbatchOptions.from_dict({**self.sbatch, "preamble": self.preamble}, field_prefix="sbatch")
        except ValueError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def connection_id(self) -> str:
        return self.conn_id or f"facility_{self.name}"


class TrainingConfig(_Strict):
    """Hyperparameters of the facility training task (``python -m xffl_tasks.train``).

    ``command``, when set, replaces the training command: a shell template with the
    placeholders ``{python}``, ``{model}``, ``{data}`` and ``{out}`` (already quoted).
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    command: str | None = None

    @model_validator(mode="after")
    def _known_placeholders(self) -> TrainingConfig:
        if self.command is not None:
            names = set(re.findall(r"{(\w*)}", self.command))
            unknown = names - {"python", "model", "data", "out"}
            if unknown:
                raise ValueError(f"command: unknown placeholder(s) {sorted(unknown)}; use {{python}} {{model}} {{data}} {{out}}")
        for key, value in self.hyperparameters.items():
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


class AggregationConfig(_Strict):
    strategy: str = "fedavg"
    options: dict[str, float] = Field(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; one of {', '.join(STRATEGIES)}")
        return value


class ConvergenceConfig(_Strict):
    """When a campaign stops: after ``max_rounds`` rounds; or when the sample-weighted
    validation loss of the global model improved by less than ``min_improvement`` for
    ``patience`` rounds in a row; or when the global update norm falls below
    ``min_update_norm``."""

    max_rounds: int = Field(default=3, ge=1, le=10000)
    min_improvement: float = Field(default=0.0, ge=0)
    patience: int = Field(default=1, ge=1)
    min_update_norm: float = Field(default=0.0, ge=0)


class RetryConfig(_Strict):
    """Retries of every remote step (push, train, pull)."""

    retries: int = Field(default=2, ge=0, le=20)
    retry_delay_s: float = Field(default=30.0, ge=0)
    max_retry_delay_s: float = Field(default=600.0, ge=0)
    train_timeout_h: float = Field(default=48.0, gt=0)


class FederationConfig(_Strict):
    campaign: str
    storage: str
    base_model: str
    facilities: list[FacilityConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    convergence: ConvergenceConfig = Field(default_factory=ConvergenceConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    quorum: int | None = Field(default=None, ge=1)
    schedule: str | None = None
    warm_start: bool = False
    description: str = ""

    @field_validator("campaign")
    @classmethod
    def _campaign(cls, value: str) -> str:
        if not re.fullmatch(CAMPAIGN, value):
            raise ValueError(f"a campaign name is 1-64 of a-z, 0-9, _ and -, starting with a letter; got {value!r}")
        return value

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
        return self

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


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, environ: dict[str, str], *, where: str = "") -> Any:
    """Replaces ``${NAME}`` in every string with the environment variable NAME.

    An undefined variable is an error naming the field, never an empty string.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, environ, where=f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, environ, where=f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):
        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return environ[name]

        return ENV_REFERENCE.sub(value, data)
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FederationConfig:
    """Reads and validates a federation config file, with ``overrides`` merged on top.

    ``${NAME}`` in a string value is replaced by the environment variable NAME.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the federation config: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if overrides:
        data = merge(data if isinstance(data, dict) else {}, overrides)
    try:
        data = expand_env(data, dict(os.environ))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return parse_config(data, source=str(path))


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
