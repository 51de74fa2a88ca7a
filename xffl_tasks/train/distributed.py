"""The process group, the device, and how the model is spread over the processes.

- one process: the model as it is, on the CPU or one GPU;
- DDP (``DistributedDataParallel``) over gloo on CPUs (or NCCL when asked for on GPUs);
- FSDP2 (``fully_shard``) on GPUs (and on CPUs over gloo when asked for): each decoder layer
  and then the root sharded, bf16 compute with fp32 reductions. The model is built on the meta
  device on every rank, rank 0 alone reads the checkpoint, and the weights reach the others by
  broadcast, so a node does not hold one full copy per GPU. At the end each rank writes its own
  shards and rank 0 consolidates them (:mod:`xffl_tasks.train.sharded_checkpoint`).
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xffl_tasks.launch import DistributedLaunch, export_launch
from xffl_tasks.train.checkpoint import ModelFolder, load_model
from xffl_tasks.train.config import ConfigError, TrainingConfig, TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains."""

    launch: DistributedLaunch
    device: torch.device
    precision: str  # fp32 | bf16
    parallelism: str  # none | ddp | fsdp

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None


def resolve_runtime(config: TrainingConfig, launch: DistributedLaunch) -> Runtime:
    """Picks device, precision and parallelism from the config and what this machine has."""
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise ConfigError("device: cuda was asked for, but no GPU is visible to this process")
    if config.device == "cuda" or (config.device == "auto" and has_cuda):
        count = torch.cuda.device_count()
        # srun --gpus-per-task (or a GPU binding) may leave one visible GPU per task.
        device = torch.device("cuda", launch.local_rank % count)
    else:
        device = torch.device("cpu")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 was asked for, but this GPU does not support bfloat16")
    if launch.world_size == 1:
        parallelism = "none"
    elif config.parallelism == "auto":
        parallelism = "fsdp" if device.type == "cuda" else "ddp"
    else:
        parallelism = config.parallelism
    return Runtime(launch, device, precision, parallelism)


def init_process_group(runtime: Runtime) -> None:
    if runtime.launch.world_size == 1:
        return
    export_launch(runtime.launch, os.environ)
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        device_id=runtime.device if runtime.device.type == "cuda" else None,
    )
    log.info(
        "process group up: rank %d of %d (%s), master %s:%d",
        runtime.launch.rank, runtime.launch.world_size, backend, runtime.launch.master_addr, runtime.launch.master_port,
    )  # fmt: skip


def close_process_group() -> None:
    """Every rank meets at a barrier, then the group goes.

    Without the barrier a rank that finished the last collective first tears its side down
    while the other still reads it, and that one can hang at exit (seen with gloo on CPUs).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.launch.world_size > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.launch.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(value: bool, runtime: Runtime) -> bool:
    """Rank 0's ``value`` on every rank (e.g. whether rank 0 saved the output)."""
    if runtime.launch.world_size == 1:
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=_collective_device(runtime))
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def broadcast_text(text: str | None, runtime: Runtime) -> str | None:
    """Rank 0's ``text`` (or None) on every rank, sent as UTF-8 bytes in tensors.

    Not ``broadcast_object_list``: it pickles the objects and the other ranks unpickle them,
    and nothing here loads a pickle."""
    if runtime.launch.world_size == 1:
        return text
    device = _collective_device(runtime)
    data = text.encode("utf-8") if runtime.launch.is_main and text is not None else b""
    size = len(data) if runtime.launch.is_main and text is not None else -1
    length = torch.tensor([size], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    size = int(length.item())
    if size <= 0:
        return None if size < 0 else ""
    if runtime.launch.is_main:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes().decode("utf-8")


def _collective_device(runtime: Runtime) -> torch.device:
    return runtime.device if runtime.device.type == "cuda" else torch.device("cpu")


def _layers_to_shard(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def build_model(
    source: ModelFolder, config: TrainingConfig, runtime: Runtime, adapter: Any = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model to train, the plain model inside it)``, loaded and placed for ``runtime``;
    with ``adapter`` (an ``AdapterPlan``), the base frozen under PEFT's LoRA layers."""
    if runtime.parallelism == "fsdp":
        return _build_fsdp(source, config, runtime, adapter)
    model = load_model(source)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if adapter is not None:
        from xffl_tasks.train.adapter_training import attach

        model = attach(model, adapter)
    model.to(runtime.device)
    if runtime.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), model
    return model, model


def _build_fsdp(
    source: ModelFolder, config: TrainingConfig, runtime: Runtime, adapter: Any = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    full = load_model(source) if runtime.launch.is_main else None
    model_config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if adapter is not None:  # the same LoRA layers on both, so their state dicts match
        from xffl_tasks.train.adapter_training import attach

        full = attach(full, adapter) if full is not None else None
        model = attach(model, adapter, load_weights=False)
    mesh = init_device_mesh(runtime.device.type, (runtime.launch.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=runtime.compute_dtype, reduce_dtype=torch.float32)
    for layer in _layers_to_shard(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=runtime.device)
    _parameters_from_rank0(model, full, runtime)
    # Buffers (the rotary frequencies...) are not sharded and most are not in the state dict:
    # rank 0's loaded values reach everyone.
    for name, buffer in model.named_buffers():
        value = (
            full.get_buffer(name).to(runtime.device)
            if full is not None
            else torch.empty_like(buffer)
        )
        dist.broadcast(value, src=0)
        buffer.copy_(value)
    del full
    return model, model


@torch.no_grad()
def _parameters_from_rank0(
    model: torch.nn.Module, full: torch.nn.Module | None, runtime: Runtime
) -> None:
    """Rank 0's loaded parameters (``full``) into every rank's shards of ``model``, one tensor
    at a time by broadcast, each rank keeping its piece as its DTensor's placement gives it.

    Every rank built the same model, so each knows every parameter's name, shape and dtype:
    only tensor data crosses the wire. (torch's ``set_model_state_dict(...,
    broadcast_from_rank0=True)`` sends the state dict's description as a pickle, which the
    other ranks unpickle.)"""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    targets = dict(model.named_parameters())  # tied ones once
    problem = None
    if full is not None:
        sources = dict(full.named_parameters())
        wrong = sorted(
            set(targets) ^ set(sources)
            | {n for n in set(targets) & set(sources) if targets[n].shape != sources[n].shape}
        )
        if wrong:
            problem = f"the loaded model does not match the sharded one: {wrong[:3]}"
    if not broadcast_flag(problem is None, runtime):
        raise TrainingError(problem or "rank 0's loaded model does not match; see its log")
    for name, target in targets.items():
        if full is not None:
            value = sources[name].detach().to(runtime.device, target.dtype)
        else:
            value = torch.empty(target.shape, dtype=target.dtype, device=runtime.device)
        dist.broadcast(value, src=0)
        if isinstance(target, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                target.shape, target.device_mesh, target.placements
            )
            value = value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            target = target.to_local()
        target.copy_(value)


def reshard(model: torch.nn.Module, runtime: Runtime) -> None:
    """After forward passes with no backward (validation), puts FSDP2's parameters back into
    their sharded form. The root module keeps its parameters gathered after a forward pass
    (its backward would need them at once); left so, ``model.parameters()`` would hand the
    optimizer the gathered copies instead of the shards, and training would silently stall."""
    if runtime.parallelism != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def accumulation_context(
    model: torch.nn.Module, runtime: Runtime, *, sync: bool
) -> AbstractContextManager:
    """Skips the gradient reduction on all but the last micro-batch of a step."""
    if runtime.parallelism == "ddp" and not sync:
        return model.no_sync()
    if runtime.parallelism == "fsdp":
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def autocast(runtime: Runtime) -> AbstractContextManager:
    """bf16 autocast where the wrapper does not cast itself (FSDP2 does, by its policy)."""
    if runtime.compute_dtype is None or runtime.parallelism == "fsdp":
        return nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.compute_dtype)


def full_state_dict(
    model: torch.nn.Module,
    plain: torch.nn.Module,
    runtime: Runtime,
    *,
    staging: Path | None = None,
    adapter_only: bool = False,
) -> dict[str, Any] | None:
    """The whole model's tensors on rank 0's CPU; None elsewhere.

    DDP (or one process): rank 0's replica. FSDP2: a collective; every rank writes its shards
    into ``staging`` (rank 0's staging folder; the others learn it from rank 0), then rank 0
    consolidates them (see :mod:`xffl_tasks.train.sharded_checkpoint`); with ``adapter_only``
    only the LoRA tensors are written and returned.
    """
    if runtime.parallelism == "fsdp":
        return _consolidated_shards(model, runtime, staging, adapter_only)
    if not runtime.launch.is_main:
        return None
    return {name: tensor.detach().to("cpu") for name, tensor in plain.state_dict().items()}


def _consolidated_shards(
    model: torch.nn.Module, runtime: Runtime, staging: Path | None, adapter_only: bool
) -> dict[str, Any] | None:
    from xffl_tasks.train import sharded_checkpoint as shards

    where = str(staging / shards.SHARDS) if runtime.launch.is_main and staging else None
    where = broadcast_text(where, runtime)
    if where is None:
        raise TrainingError("rank 0 has no staging folder for the sharded checkpoint")
    folder = Path(where)
    shards.save_shards(model, folder, keep=shards.is_adapter_tensor if adapter_only else None)
    state, failure = None, None
    if runtime.launch.is_main:
        try:
            state = shards.consolidate(folder, world_size=runtime.launch.world_size)
        except Exception as error:  # noqa: BLE001 - every rank must learn of it first
            failure = error
        finally:
            shards.remove_shards(folder)
    if not broadcast_flag(failure is None, runtime):
        if failure is not None:
            raise failure
        raise TrainingError("rank 0 could not consolidate the sharded checkpoint; see its log")
    return state


def grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clips the gradients to ``max_norm`` (0: no clipping) and returns their total norm."""
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], limit
    )
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def loss_of(model: torch.nn.Module, batch: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    with autocast(runtime):
        return model(input_ids=batch, labels=batch).loss.float()


def default_threads(environ: dict[str, str], launch: DistributedLaunch) -> int | None:
    """Threads per process from Slurm's ``SLURM_CPUS_PER_TASK``: all of them for an srun task,
    a fair share for each of torchrun's workers (torchrun is the one Slurm task on its node)."""
    text = environ.get("SLURM_CPUS_PER_TASK", "")
    if not text.isdigit() or int(text) < 1:
        return None
    cpus = int(text)
    if launch.source == "torchrun":
        cpus = max(1, cpus // max(1, launch.local_world_size))
    return cpus


def set_threads(config: TrainingConfig, environ: dict[str, str], launch: DistributedLaunch) -> int:
    """torch's CPU threads: ``threads``, else from SLURM_CPUS_PER_TASK, else torch's choice."""
    threads = config.threads if config.threads is not None else default_threads(environ, launch)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
