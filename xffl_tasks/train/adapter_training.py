"""Training a LoRA adapter instead of the whole model (``--adapter DIR`` or ``--peft lora``).

The base model is frozen; PEFT's LoRA layers wrap the target modules, and only their A and B
matrices train (only B with ``--no-lora-train-a``: the ``lora-frozen-a`` federation). The
model is wrapped before DDP or FSDP2 sees it, so either parallelism shards or replicates the
adapted model as it would the full one. The output is a PEFT adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``) with the input adapter's tensor names
and dtypes, checked before it is published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraSettings,
    lora_pairs,
    read_adapter_config,
    write_adapter_config,
)
from xffl_tasks.train.checkpoint import ModelFolder, read_safetensors_header
from xffl_tasks.train.config import ConfigError, TrainingConfig

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class AdapterPlan:
    """What adapter this run trains: its settings, the folder it continues (None: a fresh
    one from the seed), whether A trains, and the input's tensor dtypes (kept on output)."""

    settings: LoraSettings
    folder: Path | None
    train_a: bool
    dtypes: dict[str, str]


def plan_adapter(config: TrainingConfig) -> AdapterPlan | None:
    """The run's adapter, checked before anything loads (ConfigError naming the field)."""
    if not config.uses_adapter:
        return None
    if config.adapter is not None and config.peft is not None:
        raise ConfigError(
            "--adapter and --peft: give one (the adapter's own adapter_config.json sets r, alpha, modules)"
        )
    if config.adapter is None:
        try:
            settings = LoraSettings(
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=tuple(config.lora_target_modules.split(",")),
            )
        except AdapterError as error:
            raise ConfigError(f"--lora-*: {error}") from None
        return AdapterPlan(settings, None, config.lora_train_a, {})
    folder = Path(config.adapter)
    if not folder.is_dir():
        raise ConfigError(f"--adapter {folder}: not a folder")
    for entry in folder.iterdir():
        if entry.name.lower().endswith(PICKLES):
            raise ConfigError(
                f"--adapter {folder}: pickle checkpoint {entry.name!r} is refused (safetensors only)"
            )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"--adapter {folder}: no {ADAPTER_WEIGHTS}")
    try:
        settings = read_adapter_config(folder)
        header = read_safetensors_header(folder / ADAPTER_WEIGHTS)
        lora_pairs(header)
    except (AdapterError, ConfigError) as error:
        raise ConfigError(f"--adapter: {error}") from None
    return AdapterPlan(
        settings, folder, config.lora_train_a, {k: v["dtype"] for k, v in header.items()}
    )


def attach(model: Any, plan: AdapterPlan, *, load_weights: bool = True) -> Any:
    """``model`` wrapped by PEFT's LoRA layers, the base frozen, the adapter's weights loaded
    (when ``load_weights``; a model on the meta device gets its values later)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    settings = plan.settings
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, lora)
    if plan.folder is not None and load_weights:
        from safetensors.torch import load_file

        tensors = load_file(str(plan.folder / ADAPTER_WEIGHTS))
        expected = adapter_shapes(wrapped)
        if set(tensors) != set(expected):
            extra = sorted(set(tensors) ^ set(expected))
            raise ConfigError(
                f"--adapter {plan.folder}: tensor {extra[0]!r} does not match the model's LoRA layers"
            )
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != expected[name]:
                raise ConfigError(
                    f"--adapter {plan.folder}: {name} has shape {list(tensor.shape)}, the model needs {list(expected[name])}"
                )
        set_peft_model_state_dict(wrapped, tensors)
    for name, parameter in wrapped.named_parameters():
        trainable = ".lora_B." in name or (".lora_A." in name and plan.train_a)
        parameter.requires_grad_(trainable)
    return wrapped


def adapter_shapes(wrapped: Any) -> dict[str, tuple[int, ...]]:
    from peft import get_peft_model_state_dict

    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(wrapped).items()}


def adapter_state(wrapped: Any, state: dict[str, Any], plan: AdapterPlan) -> dict[str, Any]:
    """The adapter's tensors in PEFT's saved names, cast back to the input adapter's dtypes."""
    import torch
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(wrapped, state_dict=state)
    dtypes = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
    }
    out = {}
    for name, tensor in tensors.items():
        dtype = dtypes.get(plan.dtypes.get(name, "F32"), torch.float32)
        out[name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def write_adapter(
    staging: Path, tensors: dict[str, Any], plan: AdapterPlan, source: ModelFolder
) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` into ``staging``, checked
    against the input adapter (same names, shapes, dtypes) before they are published."""
    import torch
    from safetensors.torch import save_file

    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"the trained adapter's {name} holds NaN or Inf")
    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if plan.folder is not None:
        config = json.loads((plan.folder / ADAPTER_CONFIG).read_text())
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        write_adapter_config(staging, plan.settings, str(source.path))
    written = read_safetensors_header(staging / ADAPTER_WEIGHTS)
    lora_pairs(written)
    if plan.folder is not None:
        before = read_safetensors_header(plan.folder / ADAPTER_WEIGHTS)
        for name, entry in before.items():
            theirs = written.get(name)
            if (
                theirs is None
                or theirs["shape"] != entry["shape"]
                or theirs["dtype"] != entry["dtype"]
            ):
                raise ConfigError(f"the written adapter differs from the input's at {name}")
        if set(written) != set(before):
            raise ConfigError("the written adapter has tensors the input adapter lacks")
