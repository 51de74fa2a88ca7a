"""The knobs a run may turn: the only settings a person who triggers the DAG can change.

A federation's config file is written by its author and reviewed like a deployment file; it
decides everything that runs or is read at a facility and on the worker (commands, paths,
connections, sbatch options, storage). A person who may trigger the DAG chooses only among the
knobs the config opens (``overridable``, default :data:`DEFAULT_OVERRIDABLE`), each a typed
value with a range: training hyperparameters and convergence settings. Anything else in a
run's conf is refused before any task does work, naming the field (docs/security.md, rule R2).

Every knob is one run parameter with a flat name (``learning_rate``, ``max_rounds``), shown in
the trigger form as a typed field whose default is the config's value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xffl_airflow.federation.errors import RunConfError
from xffl_tasks.train.config import FIELDS_BY_NAME, TrainingConfig

#: The run parameters every federation DAG has, besides its knobs.
RUN_PARAMETERS = ("campaign", "round")


@dataclass(frozen=True)
class Knob:
    """One overridable setting: its config path, its run parameter, its type and range."""

    path: str
    kind: str  # "number", "integer", "boolean" or "enum"
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def param(self) -> str:
        return self.path.split(".", 1)[1]

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the run parameter (what Airflow's form and API check)."""
        if self.kind == "enum":
            schema: dict[str, Any] = {"type": "string", "enum": list(self.choices)}
        else:
            schema = {"type": self.kind}
            if self.minimum is not None:
                schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
            if self.maximum is not None:
                schema["maximum"] = self.maximum
        if self.nullable:
            schema["type"] = [schema["type"], "null"]
        return schema

    def check(self, value: Any) -> Any:
        """``value`` if it is of the knob's type and in its range, else a RunConfError."""
        where = f"params.{self.param} ({self.path})"
        if value is None:
            if self.nullable:
                return None
            raise RunConfError(f"{where}: must be set, got null")
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise RunConfError(f"{where}: must be true or false, got {_shown(value)}")
            return value
        if self.kind == "enum":
            if value not in self.choices:
                raise RunConfError(f"{where}: must be one of {', '.join(self.choices)}, got {_shown(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "a whole number" if self.kind == "integer" else "a number"
            raise RunConfError(f"{where}: must be {what}, got {_shown(value)}")
        if self.kind == "integer" and not (isinstance(value, int) or float(value).is_integer()):
            raise RunConfError(f"{where}: must be a whole number, got {_shown(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise RunConfError(f"{where}: must be a finite number, got {_shown(value)}")
        low = self.minimum
        if low is not None and (number < low or (self.exclusive_minimum and number == low)):
            raise RunConfError(f"{where}: must be {'>' if self.exclusive_minimum else '>='} {low:g}, got {_shown(value)}")
        if self.maximum is not None and number > self.maximum:
            raise RunConfError(f"{where}: must be <= {self.maximum:g}, got {_shown(value)}")
        return int(number) if self.kind == "integer" else number


def _shown(value: Any) -> str:
    """A run value in an error: its repr, cut short (never a long or multi-line echo)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Upper bounds of the training knobs: the task's own table has lower bounds only; a run may
# not ask for more than a campaign could sensibly use.
_TRAINING_MAXIMA = {
    "learning_rate": 1.0,
    "warmup_steps": 10**6,
    "weight_decay": 1.0,
    "max_grad_norm": 1e3,
    "batch_size": 4096,
    "gradient_accumulation": 4096,
    "seq_len": 1 << 20,
    "epochs": 1000,
    "max_steps": 10**7,
    "seed": 2**31 - 1,
    "val_max_sequences": 10**7,
    "log_every": 10**6,
}
#: The training hyperparameters a config may open: numbers, flags and choices that change how
#: well a model trains, never where or how it runs (paths, devices, threads, ports, parallelism).
TRAINING_KNOBS = (
    "learning_rate", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "adam_beta1",
    "adam_beta2", "max_grad_norm", "batch_size", "gradient_accumulation", "seq_len", "epochs",
    "max_steps", "seed", "precision", "val_max_sequences", "gradient_checkpointing", "log_every",
)  # fmt: skip
_KINDS = {"float": "number", "int": "integer", "bool": "boolean", "str": "enum"}


def _training_knob(name: str) -> Knob:
    spec = FIELDS_BY_NAME[name]
    return Knob(
        path=f"training.{name}",
        kind=_KINDS[spec.kind],
        help=spec.help,
        minimum=spec.minimum,
        maximum=spec.maximum if spec.maximum is not None else _TRAINING_MAXIMA.get(name),
        exclusive_minimum=spec.exclusive_minimum,
        choices=spec.choices,
        nullable=spec.optional,
    )


CONVERGENCE_KNOBS = (
    Knob("convergence.max_rounds", "integer", "rounds in the campaign at most", minimum=1, maximum=10000),
    Knob("convergence.min_improvement", "number", "stop when the weighted validation loss improves less",
         minimum=0, maximum=1e6),
    Knob("convergence.patience", "integer", "rounds in a row without improvement before stopping",
         minimum=1, maximum=10000),
    Knob("convergence.min_update_norm", "number", "stop when the global update norm falls below",
         minimum=0, maximum=1e6),
)  # fmt: skip

#: Every knob a config may open, by config path.
CATALOGUE: dict[str, Knob] = {
    **{f"training.{name}": _training_knob(name) for name in TRAINING_KNOBS},
    **{knob.path: knob for knob in CONVERGENCE_KNOBS},
}
#: What a config opens when it says nothing (``overridable`` absent).
DEFAULT_OVERRIDABLE = (
    "training.learning_rate", "training.lr_schedule", "training.warmup_steps", "training.max_steps",
    "training.epochs", "training.seed", "convergence.max_rounds", "convergence.min_improvement",
    "convergence.patience", "convergence.min_update_norm",
)  # fmt: skip


def check_overridable(paths: list[str]) -> list[str]:
    """The config's ``overridable`` list: known knobs, no two with the same run parameter."""
    for index, path in enumerate(paths):
        if not isinstance(path, str) or path not in CATALOGUE:
            shown = path if isinstance(path, str) and re.fullmatch(r"[a-z_.]{1,64}", path) else "this entry"
            raise ValueError(
                f"[{index}]: {shown} cannot be opened to runs; a run may change only training "
                "hyperparameters and convergence settings (docs/security.md, R2): "
                + ", ".join(CATALOGUE)
            )
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]} is listed twice")
    return paths


def knobs_of(paths: list[str]) -> list[Knob]:
    return [CATALOGUE[path] for path in paths]


def current_value(knob: Knob, sections: Mapping[str, Mapping[str, Any]]) -> Any:
    """The config's value of ``knob`` (the training task's default when the config omits it)."""
    section = sections.get(knob.section) or {}
    if knob.param in section:
        return section[knob.param]
    if knob.section == "training":
        return getattr(TrainingConfig(), knob.param)
    return None


def accept_run_conf(
    conf: Mapping[str, Any] | None, knobs: list[Knob], defaults: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The overrides a run's conf asks for, as ``{section: {name: value}}``.

    ``defaults`` are the config's values by run parameter; a value equal to it is no override.
    A conf key that is neither a run parameter nor an opened knob is refused, naming it (and
    every nested field under it, so ``overrides.training.command`` reads as such).
    """
    conf = dict(conf or {})
    by_param = {knob.param: knob for knob in knobs}
    refused = [key for key in conf if key not in RUN_PARAMETERS and key not in by_param]
    if refused:
        fields = sorted({path for key in refused for path in _paths(key, conf[key])})
        opened = ", ".join(by_param) or "none"
        raise RunConfError(
            f"run conf: {', '.join(fields)}: not a setting a run may change (the config file decides "
            f"commands, paths, connections, sbatch options and storage; the knobs it opens: {opened}). "
            "Nothing was run; see docs/security.md"
        )
    overrides: dict[str, dict[str, Any]] = {}
    for param, value in conf.items():
        knob = by_param.get(param)
        if knob is None:
            continue
        value, default = knob.check(value), defaults.get(param)
        if value == default and (value is None) == (default is None):
            continue  # the config's own value (3 and 3.0 alike)
        overrides.setdefault(knob.section, {})[knob.param] = value
    return overrides


def _paths(key: str, value: Any, depth: int = 0) -> list[str]:
    """Dotted names of a refused conf entry (bounded, printable), for the error message."""
    name = key if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(key)) else "<unprintable key>"
    if isinstance(value, Mapping) and value and depth < 3:
        return [f"{name}.{sub}" for k, v in list(value.items())[:20] for sub in _paths(k, v, depth + 1)]
    return [name]
