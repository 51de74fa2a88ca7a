"""PEFT LoRA adapter folders: what training writes, the aggregation reads and the merge applies.

A folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` (PEFT's own layout, so
``PeftModel.from_pretrained`` loads it), and ``metrics.json`` when a facility trained it. For a
base weight ``model.layers.0.self_attn.q_proj.weight`` of shape ``[out, in]`` the adapter holds
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``); the merged weight is ``W + scaling * B @ A`` with
``scaling = lora_alpha / r``. Only plain LoRA is accepted (no DoRA, no per-module ranks, no
extra trainable modules), so that every strategy's arithmetic holds for every layer. Under
``lora-stacked`` each facility may have its own r and alpha (:meth:`LoraSettings.for_facility`);
the other strategies need one r and alpha for all (``lora_options.check_ranks``).

The initial adapter of a campaign is made here from the base model's safetensors headers alone
(A uniform in +-1/sqrt(in) as PEFT's Kaiming init, B zero, from a seed), so every facility
starts from the same A without loading the base model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The attention projections of LLaMA-like models.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
KEY_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
MAX_CONFIG_BYTES = 64 << 10
MAX_RANK = 4096
MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,128}$")


class AdapterError(ValueError):
    """An adapter folder or setting is invalid; the message names the folder and the field."""


@dataclass(frozen=True)
class LoraSettings:
    """Plain LoRA: rank, alpha, dropout and the modules (by last name) it adapts."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise AdapterError(f"r: must be a whole number from 1 to {MAX_RANK}, got {self.r!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise AdapterError(f"alpha: must be a positive number, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0 <= self.dropout < 1)
        ):
            raise AdapterError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        modules = tuple(self.target_modules)
        if not modules or any(
            not isinstance(m, str) or not MODULE_NAME.fullmatch(m) for m in modules
        ):
            raise AdapterError(
                f"target_modules: a non-empty list of module names, got {self.target_modules!r}"
            )
        if len(set(modules)) != len(modules):
            raise AdapterError(f"target_modules: repeated names in {list(modules)}")
        object.__setattr__(self, "target_modules", tuple(sorted(modules)))  # a set, in effect

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r

    def for_facility(self, r: int | None = None, alpha: float | None = None) -> LoraSettings:
        """These settings with a facility's own rank and alpha (None: keep the campaign's),
        checked as any settings are."""
        return replace(
            self, r=self.r if r is None else r, alpha=self.alpha if alpha is None else alpha
        )

    def to_config(self, base_model: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT reads (``LoraConfig``'s fields; the rest default)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path, *, label: str | None = None) -> LoraSettings:
    """The folder's LoRA settings; anything but plain LoRA (DoRA, per-module ranks, extra
    trainable modules, rsLoRA, a regex of modules) is refused, naming the field."""
    folder = Path(folder)
    where = f"{label or folder}: {ADAPTER_CONFIG}"
    try:
        with open(folder / ADAPTER_CONFIG, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise AdapterError(f"{where}: cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{where}: must be a JSON object")
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {data.get('peft_type')!r} is not LORA")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if data.get(key, plain) not in (plain, None):
            raise AdapterError(f"{where}: {key} must be {str(plain).lower()} (plain LoRA only)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if data.get(key):
            raise AdapterError(f"{where}: {key} must be empty (one rank and alpha for every layer)")
    if data.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias must be 'none'")
    modules = data.get("target_modules")
    if not isinstance(modules, list):
        raise AdapterError(
            f"{where}: target_modules must be a list of module names, got {modules!r}"[:300]
        )
    try:
        return LoraSettings(
            r=data.get("r"),
            alpha=data.get("lora_alpha"),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=tuple(modules),
        )
    except AdapterError as error:
        raise AdapterError(f"{where}: {error}") from None


def write_adapter_config(
    folder: Path, settings: LoraSettings, base_model: str | None = None
) -> Path:
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps(settings.to_config(base_model), indent=2, sort_keys=True) + "\n")
    return path


def module_of(key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> ``("X", "A")``; anything else is an error."""
    for suffix, part in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
        if key.startswith(KEY_PREFIX) and key.endswith(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], part
    raise AdapterError(
        f"tensor {key!r} is not a LoRA A or B matrix (base_model.model.<module>.lora_A.weight)"
    )


def adapter_key(module: str, part: str) -> str:
    return f"{KEY_PREFIX}{module}{A_SUFFIX if part == 'A' else B_SUFFIX}"


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module -> (A key, B key), in name order; an A without its B (or any other tensor) is an error."""
    parts: dict[str, dict[str, str]] = {}
    for name in names:
        module, part = module_of(name)
        parts.setdefault(module, {})[part] = name
    for module, found in parts.items():
        if set(found) != {"A", "B"}:
            raise AdapterError(f"module {module!r} has lora_{''.join(found)} but not both A and B")
    return {module: (found["A"], found["B"]) for module, found in sorted(parts.items())}


def base_weight_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a model folder, from the safetensors headers (no data read)."""
    from xffl_tasks.aggregate.model_folder import open_model_folder

    folder = open_model_folder(base, label=f"base model {base}")
    return {name: tuple(location.entry.shape) for name, location in folder.tensors.items()}


def target_weights(
    shapes: Mapping[str, tuple[int, ...]], settings: LoraSettings
) -> dict[str, tuple[int, int]]:
    """Module -> (out, in) for every 2-D ``<module>.weight`` whose last name is a target."""
    found = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in settings.target_modules:
            found[module] = (int(shape[0]), int(shape[1]))
    if not found:
        raise AdapterError(
            f"target_modules {list(settings.target_modules)} match no 2-D weight of the base model"
        )
    return dict(sorted(found.items()))


def initial_adapter(
    base: Path,
    out: Path,
    settings: LoraSettings,
    *,
    seed: int = 0,
    r: int | None = None,
    alpha: float | None = None,
) -> Path:
    """Writes a fresh adapter for ``base`` to ``out`` (A as PEFT initialises it, B zero),
    reading only the base's safetensors headers; ``out`` appears complete or not at all.
    ``r`` and ``alpha`` give a facility its own rank and alpha (lora-stacked)."""
    import torch
    from safetensors.torch import save_file

    settings = settings.for_facility(r, alpha)
    out = Path(out)
    if out.exists():
        raise AdapterError(f"{out}: already exists")
    modules = target_weights(base_weight_shapes(Path(base)), settings)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, columns) in modules.items():
        bound = 1.0 / math.sqrt(columns)  # kaiming_uniform_(a=sqrt(5)), as PEFT and nn.Linear
        a = (
            torch.rand(settings.r, columns, generator=generator, dtype=torch.float64) * (2 * bound)
            - bound
        )
        tensors[adapter_key(module, "A")] = a.to(torch.float32)
        tensors[adapter_key(module, "B")] = torch.zeros(rows, settings.r, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_adapter_config(staging, settings, str(base))
        os.chmod(staging, 0o755)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
