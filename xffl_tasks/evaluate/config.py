"""The evaluation task's configuration: candidates, data, output, and the training's settings.

``python -m xffl_tasks.evaluate`` takes the training task's hyperparameter flags and ``--config``
file unchanged (``xffl_tasks.train.config.FIELDS``, the same validation and messages), so the
Airflow side passes the evaluation job the very flags the training job got. The ones that
shape the validation loss are used exactly as training uses them (``EVALUATION_FIELDS``:
``seq_len``, ``seed``, ``batch_size``, the validation data, precision, device, parallelism,
threads); the others (learning rate, LoRA settings of a new adapter...) are accepted and have
no effect. No torch here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xffl_tasks.evaluate.result import MAX_CANDIDATES, NAME
from xffl_tasks.train.config import (
    FIELDS,
    FIELDS_BY_NAME,
    HYPERPARAMETERS,
    ConfigError,
    TrainingConfig,
    build_config,
    load_config_file,
    parse_text,
)

#: The training fields that shape the validation loss; the other hyperparameters are ignored.
EVALUATION_FIELDS = (
    "seq_len", "seed", "batch_size", "precision", "parallelism", "device", "val_split",
    "val_file", "val_max_sequences", "text_field", "threads", "master_port",
    "gradient_checkpointing",
)  # fmt: skip
#: What a ``--config`` file may hold: the hyperparameters and the data path.
CONFIG_FIELDS = (*HYPERPARAMETERS, "data")
CANDIDATE = re.compile(r"^(?P<name>[^=]*)=(?P<path>.*)$")


@dataclass(frozen=True)
class Candidate:
    """A model to evaluate, by the name it has in evaluation.json: a model folder, or (with
    ``--base``) a LoRA adapter folder applied to the base."""

    name: str
    path: Path


@dataclass(frozen=True)
class EvaluationConfig:
    """One evaluation job: its candidates, the data, the output folder, the base model (LoRA)
    and the training settings (``settings.model``/``out`` unused)."""

    candidates: tuple[Candidate, ...]
    data: str
    out: str
    base: str | None = None
    settings: TrainingConfig = TrainingConfig()

    def evaluation_settings(self) -> dict[str, Any]:
        """The settings that shape the loss (what evaluation.json records)."""
        return {name: getattr(self.settings, name) for name in EVALUATION_FIELDS}


def parse_candidate(text: str, *, where: str = "--candidate") -> Candidate:
    """``NAME=DIR`` -> ``Candidate(NAME, DIR)``; ConfigError naming the flag otherwise."""
    match = CANDIDATE.fullmatch(text)
    if match is None:
        raise ConfigError(f"{where} {text!r}: expected NAME=DIR (e.g. last=/path/to/global)")
    name, path = match.group("name"), match.group("path")
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"{where} {text!r}: the name {name!r} is not 1-64 of letters, digits, _ . - "
            "(starting with a letter or digit)"
        )
    if not path or "\0" in path or "\n" in path:
        raise ConfigError(f"{where} {text!r}: the folder must be a non-empty single-line path")
    return Candidate(name, Path(path))


def check_candidates(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    if not candidates:
        raise ConfigError("--candidate: give at least one NAME=DIR")
    if len(candidates) > MAX_CANDIDATES:
        raise ConfigError(
            f"--candidate: at most {MAX_CANDIDATES} candidates, got {len(candidates)}"
        )
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.name in seen:
            raise ConfigError(f"--candidate {candidate.name}: the name is given twice")
        seen.add(candidate.name)
    return tuple(candidates)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xffl_tasks.evaluate",
        description="Evaluates models on a facility's validation data as training does (no training).",
    )
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="NAME=DIR",
        help="a model folder to evaluate, by name (repeatable); with --base, a LoRA adapter folder",
    )  # fmt: skip
    parser.add_argument(
        "--base", metavar="DIR", help="LoRA: the base model every adapter applies to"
    )
    parser.add_argument("--data", metavar="PATH", default=argparse.SUPPRESS,
                        help="the data: its validation part is evaluated, cut as training cuts it")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="where evaluation.json goes (made if missing)")
    parser.add_argument(
        "--config", metavar="JSON", help="a JSON file of the training's fields (flags win over it)"
    )
    defaults = TrainingConfig()
    for name in HYPERPARAMETERS:
        spec = FIELDS_BY_NAME[name]
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default is not None else ""
        note = "" if name in EVALUATION_FIELDS else " [training only: no effect here]"
        extra: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": spec.help + shown + note,
        }
        if spec.kind == "bool":
            parser.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **extra)
        else:
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else name.upper()
            parser.add_argument(spec.flag, metavar=metavar, **extra)
    return parser


def _file_values(path: str) -> dict[str, Any]:
    values = load_config_file(path)
    for name in values:
        if name not in CONFIG_FIELDS:
            raise ConfigError(
                f"{path}: {name}: not a field of the evaluation (--candidate and --base name the models)"
            )
    return values


def parse_arguments(argv: Sequence[str] | None) -> EvaluationConfig:
    """The validated configuration: defaults, then ``--config``, then the flags."""
    namespace = vars(build_parser().parse_args(argv))
    file_values = _file_values(namespace["config"]) if namespace.get("config") else {}
    flag_values: dict[str, Any] = {}
    for spec in FIELDS:
        if spec.name in namespace and spec.name in HYPERPARAMETERS:
            raw = namespace[spec.name]
            flag_values[spec.name] = (
                raw if isinstance(raw, bool) else parse_text(spec, raw, where=spec.flag)
            )
    data = namespace.get("data", file_values.pop("data", None))
    if data is not None:
        data = parse_text(FIELDS_BY_NAME["data"], data, where="--data")
    settings = build_config(file_values, flag_values)
    candidates = check_candidates([parse_candidate(text) for text in namespace["candidate"]])
    for flag, value in (("--data", data), ("--out", namespace.get("out"))):
        if not value:
            raise ConfigError(f"{flag}: required")
    base = namespace.get("base")
    if base is not None and (not base or "\0" in base or "\n" in base):
        raise ConfigError("--base: must be a non-empty single-line path")
    return EvaluationConfig(
        candidates=candidates,
        data=str(data),
        out=str(namespace["out"]),
        base=base,
        settings=replace(settings, model=None, data=str(data), out=None),
    )
