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
import string
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from xffl_airflow.federation.knobs import (
    CAMPAIGN,
    DEFAULT_OVERRIDABLE,
    Knob,
    check_overridable,
    current_value,
    knobs_of,
)

NAME = r"^[a-z][a-z0-9_]{0,15}$"
CONN_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}$"
# A facility path reaches remote shells (quoted) and SFTP requests: letters, digits and a few
# punctuation characters only, so that no quoting, line splitting or expansion can change it.
REMOTE_PATH = r"^/[A-Za-z0-9_./+@%,:=-]*$"
# The training command's placeholders: exactly these names, no attribute, index or format.
PLACEHOLDERS = ("python", "model", "data", "out")
# Environment variables a config file may refer to as ${NAME} (never Airflow's own, which
# hold connections and secrets).
ENV_PREFIX = "XFFL_"
# The aggregation task's strategies (xffl_tasks.aggregate); a test keeps the two in step.
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "trimmed-mean", "median")
# The strategies for LoRA adapters (training.peft; xffl_tasks.aggregate.lora_options).
ADAPTER_STRATEGIES = ("lora-fedavg", "lora-exact", "lora-frozen-a")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
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
    #: Shell lines run on the login node before every Slurm command (``module load slurm``,
    #: exports): the facility's login environment. The config author's, like ``preamble``.
    login_preamble: list[str] = Field(default_factory=list)
    #: The folder of the Slurm commands at this facility, when they are not on the login PATH.
    slurm_bin: str | None = None
    sbatch: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = Field(default=None, gt=0, allow_inf_nan=False)

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
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the facility, got {value!r}")
        if not re.fullmatch(REMOTE_PATH, value):
            odd = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_./+@%,:=-]", c)})
            raise ValueError(
                f"holds {', '.join(map(repr, odd))}: a facility path is letters, digits and _ . / + @ % , : = - "
                "only (it reaches remote shells and SFTP; see docs/security.md, R6)"
            )
        if ".." in Path(value).parts:
            raise ValueError(f"must not contain '..', got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", value):
            raise ValueError(f"must be a plain command or path (letters, digits, _ . / + -), got {value!r}")
        return value

    @field_validator("preamble", "login_preamble")
    @classmethod
    def _preamble(cls, lines: list[str]) -> list[str]:
        from xffl_airflow.slurm.validation import check_shell_line

        for index, line in enumerate(lines):
            try:
                check_shell_line(line, f"[{index}]")
            except ValueError as error:
                raise ValueError(str(error)) from None
        return lines

    @field_validator("slurm_bin")
    @classmethod
    def _slurm_bin(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(REMOTE_PATH, value) or ".." in Path(value).parts):
            raise ValueError(f"must be an absolute folder of letters, digits and _ . / + @ % , : = - only, got {value[:80]!r}")
        return value

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


class AggregationConfig(_Strict):
    """How the round's models are combined. ``max_weight_share`` (optional) caps the share of
    any one facility in the weighted average, whatever the sample counts it reports."""

    strategy: str = "fedavg"
    options: dict[str, float] = Field(default_factory=dict)
    max_weight_share: float | None = Field(default=None, gt=0, le=1)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
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


class ConvergenceConfig(_Strict):
    """When a campaign stops: after ``max_rounds`` rounds; or when the sample-weighted
    validation loss of the global model improved by less than ``min_improvement`` for
    ``patience`` rounds in a row; or when the global update norm falls below
    ``min_update_norm``."""

    max_rounds: int = Field(default=3, ge=1, le=10000)
    min_improvement: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    patience: int = Field(default=1, ge=1)
    min_update_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class RetryConfig(_Strict):
    """Retries of every remote step (push, train, pull)."""

    retries: int = Field(default=2, ge=0, le=20)
    retry_delay_s: float = Field(default=30.0, ge=0, le=86400)
    max_retry_delay_s: float = Field(default=600.0, ge=0, le=86400)
    train_timeout_h: float = Field(default=48.0, gt=0, le=24 * 365)


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


def expand_env(data: Any, environ: dict[str, str], *, where: str = "", used: dict[str, str] | None = None) -> Any:
    """Replaces ``${NAME}`` in every string with the environment variable NAME.

    Only names starting with ``XFFL_`` may be used (never ``AIRFLOW_CONN_...`` or any other
    variable of the worker); an undefined one is an error naming the field, never an empty
    string. ``used`` collects the values substituted, so errors can hide them.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, environ, where=f"{where}.{k}" if where else str(k), used=used) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, environ, where=f"{where}[{i}]", used=used) for i, v in enumerate(data)]
    if isinstance(data, str):
        def value(match: re.Match) -> str:
            name = match.group(1)
            if not name.startswith(ENV_PREFIX):
                raise ConfigError(
                    f"{where}: ${{{name}}} is not allowed; a config may refer only to environment "
                    f"variables named {ENV_PREFIX}* (docs/security.md, R3)"
                )
            if name not in environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            if used is not None:
                used[name] = environ[name]
            return environ[name]

        return ENV_REFERENCE.sub(value, data)
    return data


def _hide(message: str, used: dict[str, str]) -> str:
    """``message`` with every substituted environment value replaced by its ``${NAME}``."""
    for name, text in sorted(used.items(), key=lambda item: -len(item[1])):
        for shown in {text, repr(text)[1:-1], json.dumps(text)[1:-1]}:
            if shown:
                message = message.replace(shown, f"${{{name}}}")
    return message


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
        raise ConfigError(_hide(str(error), used)) from None


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
