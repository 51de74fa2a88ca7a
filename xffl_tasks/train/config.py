"""The training task's configuration: one typed, validated record.

Each field is settable three ways, later ones winning: its default, a JSON config file
(``--config FILE``, the field names as keys), and a command-line flag (the field name with
dashes: ``learning_rate`` -> ``--learning-rate``). Every value goes through the same
validation, and every error names the field and where it came from (the file or the flag).
No torch here: the Airflow side imports :data:`FIELDS` to check hyperparameters before it
submits a job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class TrainingError(Exception):
    """A training run cannot go on; the message is one line that says why (exit status 2 or 1)."""

    exit_code = 1


class ConfigError(TrainingError):
    """A configuration value is missing, unknown or ill-typed; the message names the field."""

    exit_code = 2


@dataclass(frozen=True)
class FieldSpec:
    """One configuration field: its type (``float``, ``int``, ``str``, ``bool``, ``path``),
    whether it may be null, its bounds or choices, and a line of help. Its default is the
    :class:`TrainingConfig` field's."""

    name: str
    kind: str
    help: str
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SIZE = r"^[1-9]\d*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "model",
        "path",
        "Hugging Face model folder: config, safetensors weights, tokenizer",
        optional=True,
    ),
    FieldSpec(
        "data",
        "path",
        "training data: a .jsonl/.txt file, a folder of them, or a pre-tokenised folder",
        optional=True,
    ),
    FieldSpec(
        "out",
        "path",
        "output folder: the trained model and metrics.json (appears only complete)",
        optional=True,
    ),
    FieldSpec(
        "learning_rate", "float", "peak learning rate of AdamW", minimum=0, exclusive_minimum=True
    ),
    FieldSpec(
        "lr_schedule",
        "str",
        "learning-rate schedule after the warm-up",
        choices=("constant", "cosine", "linear"),
    ),
    FieldSpec("warmup_steps", "int", "optimizer steps of linear warm-up from 0", minimum=0),
    FieldSpec(
        "min_lr_ratio",
        "float",
        "cosine/linear decay ends at this fraction of the peak",
        minimum=0,
        maximum=1,
    ),
    FieldSpec("weight_decay", "float", "AdamW weight decay", minimum=0),
    FieldSpec("adam_beta1", "float", "AdamW beta1", minimum=0, maximum=1),
    FieldSpec("adam_beta2", "float", "AdamW beta2", minimum=0, maximum=1),
    FieldSpec(
        "max_grad_norm", "float", "clip the gradient norm to this (0: no clipping)", minimum=0
    ),
    FieldSpec("batch_size", "int", "sequences per micro-batch per process", minimum=1),
    FieldSpec("gradient_accumulation", "int", "micro-batches per optimizer step", minimum=1),
    FieldSpec(
        "seq_len",
        "int",
        "tokens per training sequence (default: the model's context, at most 2048)",
        optional=True,
        minimum=2,
    ),
    FieldSpec(
        "epochs",
        "float",
        "passes over the training data (ignored when max_steps is set)",
        minimum=0,
        exclusive_minimum=True,
    ),
    FieldSpec(
        "max_steps",
        "int",
        "optimizer steps to run, cycling the data as needed",
        optional=True,
        minimum=1,
    ),
    FieldSpec("seed", "int", "seed of the data order and of dropout", minimum=0),
    FieldSpec(
        "precision",
        "str",
        "auto (bf16 mixed on GPUs, fp32 on CPU), fp32, or bf16 mixed",
        choices=("auto", "fp32", "bf16"),
    ),
    FieldSpec(
        "parallelism",
        "str",
        "auto (FSDP2 on GPUs, DDP on CPU), ddp or fsdp",
        choices=("auto", "ddp", "fsdp"),
    ),
    FieldSpec(
        "device",
        "str",
        "auto (a GPU if there is one), cpu or cuda",
        choices=("auto", "cpu", "cuda"),
    ),
    FieldSpec(
        "val_split",
        "float",
        "fraction of the documents held out for validation when there is no validation file",
        minimum=0,
        maximum=0.5,
        exclusive_minimum=True,
    ),
    FieldSpec(
        "val_file",
        "path",
        "a validation file (.jsonl/.txt) instead of the data's own or a split",
        optional=True,
    ),
    FieldSpec(
        "val_max_sequences",
        "int",
        "evaluate on at most this many validation sequences",
        optional=True,
        minimum=1,
    ),
    FieldSpec(
        "text_field",
        "str",
        "the field of a JSON-lines record that holds the text",
        pattern=r"^[A-Za-z0-9_.-]+$",
    ),
    FieldSpec(
        "threads",
        "int",
        "torch CPU threads (default: SLURM_CPUS_PER_TASK when set)",
        optional=True,
        minimum=1,
    ),
    FieldSpec(
        "gradient_checkpointing", "bool", "recompute activations in the backward pass (less memory)"
    ),
    FieldSpec("max_shard_size", "str", "largest safetensors shard of the output", pattern=SIZE),
    FieldSpec("log_every", "int", "log the training loss every N optimizer steps", minimum=1),
    FieldSpec(
        "master_port",
        "int",
        "rendezvous port under srun (default: MASTER_PORT, else from the job id)",
        optional=True,
        minimum=1,
        maximum=65535,
    ),
    FieldSpec(
        "adapter",
        "path",
        "a PEFT LoRA adapter folder to train on top of --model (the base stays frozen; out: an adapter)",
        optional=True,
    ),
    FieldSpec(
        "peft",
        "str",
        "lora: train a new LoRA adapter (lora_* settings), the base model frozen; out: an adapter",
        optional=True,
        choices=("lora",),
    ),
    FieldSpec("lora_r", "int", "rank of a new LoRA adapter", minimum=1, maximum=4096),
    FieldSpec("lora_alpha", "float", "alpha of a new LoRA adapter (scaling alpha/r)", minimum=0, exclusive_minimum=True),
    FieldSpec("lora_dropout", "float", "dropout of a new LoRA adapter", minimum=0, maximum=0.99),
    FieldSpec(
        "lora_target_modules",
        "str",
        "comma-separated module names a new LoRA adapter adapts",
        pattern=r"^[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*$",
    ),
    FieldSpec("lora_train_a", "bool", "train LoRA's A matrices too (--no-lora-train-a: A stays as given, only B trains)"),
    FieldSpec(
        "stacked_update",
        "path",
        "a lora-stacked update folder merged into --model (into --merged-base) before a fresh "
        "adapter (--peft lora) trains on the merged base",
        optional=True,
    ),
    FieldSpec(
        "merged_base",
        "path",
        "where --model merged with --stacked-update goes (kept if it already holds the update's result)",
        optional=True,
    ),
    FieldSpec(
        "base_hashes",
        "path",
        "a base_hashes.json the base trained on must match, or the run is refused (exit 2) naming the tensor",
        optional=True,
    ),
    FieldSpec("dp_mode", "str", "none, or dp-sgd: per-sample clipping and Gaussian noise (Opacus)", choices=("none", "dp-sgd")),
    FieldSpec("dp_noise_multiplier", "float", "dp-sgd: noise std / dp_max_grad_norm (or dp_target_epsilon)", optional=True, minimum=0, maximum=1e6),
    FieldSpec("dp_target_epsilon", "float", "dp-sgd: the noise is set so this run ends at this epsilon", optional=True, minimum=0, maximum=1e6, exclusive_minimum=True),
    FieldSpec("dp_max_grad_norm", "float", "dp-sgd: each sequence's gradient is clipped to this L2 norm", minimum=0, exclusive_minimum=True),
    FieldSpec("dp_delta", "float", "dp-sgd: delta (default 1/(10 N), N the training sequences)", optional=True, minimum=0, maximum=1, exclusive_minimum=True),
    FieldSpec("dp_accountant", "str", "dp-sgd: the accountant of the reported epsilon", choices=("rdp", "prv")),
    FieldSpec("dp_withhold_validation", "bool", "dp-sgd: no validation pass, no val_loss_* in metrics.json (held-out data, outside the guarantee)"),
)
FIELDS_BY_NAME: dict[str, FieldSpec] = {spec.name: spec for spec in FIELDS}
PATH_FIELDS = ("model", "data", "out")
#: Paths the federation passes itself, from its own layout (not hyperparameters).
ROUND_PATH_FIELDS = ("adapter", "stacked_update", "merged_base", "base_hashes")
# Every field but the paths: what the Airflow side may pass as hyperparameters.
HYPERPARAMETERS: tuple[str, ...] = tuple(
    spec.name for spec in FIELDS if spec.name not in (*PATH_FIELDS, *ROUND_PATH_FIELDS)
)


@dataclass(frozen=True)
class TrainingConfig:
    model: str | None = None
    data: str | None = None
    out: str | None = None
    learning_rate: float = 5e-5
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    batch_size: int = 8
    gradient_accumulation: int = 1
    seq_len: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    precision: str = "auto"
    parallelism: str = "auto"
    device: str = "auto"
    val_split: float = 0.1
    val_file: str | None = None
    val_max_sequences: int | None = None
    text_field: str = "text"
    threads: int | None = None
    gradient_checkpointing: bool = False
    max_shard_size: str = "5GB"
    log_every: int = 10
    master_port: int | None = None
    adapter: str | None = None
    peft: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    lora_train_a: bool = True
    stacked_update: str | None = None
    merged_base: str | None = None
    base_hashes: str | None = None
    dp_mode: str = "none"
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float | None = None
    dp_accountant: str = "rdp"
    dp_withhold_validation: bool = False

    @property
    def uses_adapter(self) -> bool:
        """Whether this run trains a LoRA adapter (the base model frozen) instead of the model."""
        return self.adapter is not None or self.peft is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hyperparameters(self) -> dict[str, Any]:
        """Every field but the paths (what metrics.json records)."""
        return {name: value for name, value in asdict(self).items() if name not in PATH_FIELDS}

    def require_paths(self) -> TrainingConfig:
        for name in PATH_FIELDS:
            if not getattr(self, name):
                raise ConfigError(
                    f"{FIELDS_BY_NAME[name].flag}: required (or {name!r} in the --config file)"
                )
        return self


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
            type(value), type(value).__name__
        )
    )


def check_value(spec: FieldSpec, value: Any, *, where: str) -> Any:
    """Validates one value of an already-typed source (JSON, Python); returns it normalised.

    ``where`` prefixes the message (``config.json: learning_rate`` or ``--learning-rate``).
    """
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if spec.kind in ("str", "path"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_type_name(value)} {value!r}")
        if not value or "\0" in value or "\n" in value:
            raise ConfigError(f"{where}: must be a non-empty single-line string")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(spec.choices)}")
        if spec.pattern and not re.fullmatch(spec.pattern, value):
            raise ConfigError(f"{where}: {value!r} is not of the form {spec.pattern}")
        return value
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(
                    f"{where}: expected a whole number, got {_type_name(value)} {value!r}"
                )
    elif spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    else:  # pragma: no cover - the table above is fixed
        raise AssertionError(spec.kind)
    if spec.minimum is not None:
        if spec.exclusive_minimum and value <= spec.minimum:
            raise ConfigError(f"{where}: must be greater than {spec.minimum:g}, got {value!r}")
        if not spec.exclusive_minimum and value < spec.minimum:
            raise ConfigError(f"{where}: must be at least {spec.minimum:g}, got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{where}: must be at most {spec.maximum:g}, got {value!r}")
    return value


def parse_text(spec: FieldSpec, text: str, *, where: str) -> Any:
    """Converts a command-line string to the field's type, then validates it."""
    if spec.optional and text.strip().lower() in ("none", "null"):
        return None
    if spec.kind == "int":
        try:
            value: Any = int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {text!r}") from None
    elif spec.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    elif spec.kind == "bool":
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{where}: expected true or false, got {text!r}")
        value = lowered in ("true", "1", "yes")
    else:
        value = text
    return check_value(spec, value, where=where)


def from_mapping(
    data: Mapping[str, Any], *, source: str, allowed: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Validates a mapping of field names to typed values; errors name ``source`` and the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: must be a JSON object of field names to values, got {_type_name(data)}"
        )
    names = allowed if allowed is not None else tuple(FIELDS_BY_NAME)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise ConfigError(f"{source}: {key}: unknown field (known: {', '.join(names)})")
        values[key] = check_value(FIELDS_BY_NAME[key], value, where=f"{source}: {key}")
    return values


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads and validates a JSON config file (the field names as keys)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path}: cannot read the config file: {getattr(error, 'strerror', None) or error}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    return from_mapping(data, source=str(path))


def build_config(
    file_values: Mapping[str, Any] | None = None, flag_values: Mapping[str, Any] | None = None
) -> TrainingConfig:
    """Defaults, then the config file's values, then the flags' (all already validated)."""
    merged: dict[str, Any] = {}
    merged.update(file_values or {})
    merged.update(flag_values or {})
    config = TrainingConfig(**merged)
    from xffl_tasks.train.dp_options import check_dp_options  # docs/privacy.md
    check_dp_options(config)  # the dp_* fields' rules across fields (it imports this module)
    return config
