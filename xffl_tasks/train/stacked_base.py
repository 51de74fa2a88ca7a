"""A ``lora-stacked`` round at a facility: merge the round's update into the base, check it,
then train a fresh adapter on it (``--stacked-update DIR --merged-base DIR [--base-hashes FILE]``).

:func:`plan_stacked_base` checks the flags and reads the update's description before the
process group starts (every rank, the same way). :func:`prepare_base` runs after it: rank 0
merges ``--model`` with the update into ``--merged-base`` (``xffl_tasks.stacked_merge``: the
base checked against the update's ``base`` record, the result against its ``result`` record
and ``--base-hashes``), or keeps a ``--merged-base`` that already holds the result (a retried
job), then tells the other ranks. Without ``--stacked-update``, ``--base-hashes`` checks
``--model`` itself. A mismatch is a refused input (exit status 2) naming the tensor.

Rank 0 merges while the others wait at a gloo broadcast (30 minutes by default): for a
model whose merge takes longer, merge before the launch with ``python -m
xffl_tasks.stacked_merge`` and pass the merged folder as ``--model``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.base_hashes import BaseHashError, BaseHashes, load_base_hashes
from xffl_tasks.stacked_update import StackedUpdate, StackedUpdateError, read_stacked_update
from xffl_tasks.train.config import ConfigError, TrainingConfig, TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackedBasePlan:
    """The base this run trains on: ``model`` merged with ``update`` into ``merged`` (or
    ``model`` itself when no update), to match ``expected`` when given."""

    model: Path
    update: Path | None
    merged: Path | None
    expected: BaseHashes | None
    description: StackedUpdate | None

    @property
    def base(self) -> Path:
        return self.merged if self.merged is not None else self.model


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def plan_stacked_base(config: TrainingConfig) -> StackedBasePlan | None:
    """The flags checked and the update's description read (ConfigError naming the flag)."""
    if config.stacked_update is None and config.merged_base is None and config.base_hashes is None:
        return None
    if (config.stacked_update is None) != (config.merged_base is None):
        raise ConfigError("--stacked-update and --merged-base: give both (the update, and where the merged base goes)")
    model = Path(config.model)
    expected = None
    if config.base_hashes is not None:
        try:
            expected = load_base_hashes(config.base_hashes)
        except BaseHashError as error:
            raise ConfigError(f"--base-hashes: {error}") from None
    if config.stacked_update is None:
        return StackedBasePlan(model, None, None, expected, None)
    if config.adapter is not None or config.peft != "lora":
        raise ConfigError(
            "--stacked-update: a lora-stacked round trains a fresh adapter on the merged base: "
            "give --peft lora (with this facility's --lora-r and --lora-alpha), not --adapter"
        )
    update, merged = Path(config.stacked_update), Path(config.merged_base)
    for path, flag in ((model, "--model"), (update, "--stacked-update"), (Path(config.out), "--out")):
        if _inside(merged, path) or _inside(path, merged):
            raise ConfigError(f"--merged-base {merged}: must lie apart from {flag} {path}")
    try:
        description = read_stacked_update(update, load_tensors=False)
    except StackedUpdateError as error:
        raise ConfigError(f"--stacked-update: {error}") from None
    return StackedBasePlan(model, update, merged, expected, description)


def _merge_or_check(plan: StackedBasePlan) -> BaseHashes:
    """Rank 0's part: the merged (or checked) base's file hashes; refusals as ConfigError."""
    from xffl_tasks.base_hashes import check_base_hashes
    from xffl_tasks.stacked_merge import REFUSALS, merge_stacked_update

    try:
        if plan.update is None:
            assert plan.expected is not None
            return check_base_hashes(plan.model, plan.expected)
        outcome = merge_stacked_update(plan.model, plan.update, plan.merged, expected=plan.expected)
    except REFUSALS as error:
        raise ConfigError(f"refusing to train on this base: {error}") from None
    if outcome.reused:
        log.info("merged base %s already holds the update's result: kept", plan.merged)
    else:
        log.info(
            "merged %s into %s in %.1f s: matches the canonical base",
            plan.update, plan.merged, outcome.seconds,
        )  # fmt: skip
    return outcome.output


def _rank0_status(status: int, runtime: Any) -> int:
    """Rank 0's ``status`` (0 ready, 2 refused, 1 failed) on every rank, through a CPU tensor
    (gloo: its timeout, not NCCL's, bounds the wait while rank 0 merges)."""
    if runtime.launch.world_size == 1:
        return status
    import torch
    import torch.distributed as dist

    flag = torch.tensor([status], dtype=torch.int32)
    dist.broadcast(flag, src=0)
    return int(flag.item())


def prepare_base(plan: StackedBasePlan, source: Any, runtime: Any) -> tuple[Any, dict[str, str]]:
    """``(the model folder to train on, its files' sha256)`` after rank 0 merged or checked it.
    If rank 0 refused the base every rank raises ConfigError (exit status 2); if it failed
    otherwise (a full disk), TrainingError (exit status 1)."""
    from xffl_tasks.train.checkpoint import inspect_model_folder

    failure: BaseException | None = None
    files: dict[str, str] = {}
    status = 0
    if runtime.launch.is_main:
        try:
            files = dict(_merge_or_check(plan).files)
        except ConfigError as error:
            failure, status = error, 2
        except Exception as error:  # noqa: BLE001 - the other ranks must hear of it first
            failure, status = error, 1
    status = _rank0_status(status, runtime)
    if failure is not None:
        raise failure
    if status == 2:
        raise ConfigError("rank 0 refused the base (see its log)")
    if status:
        raise TrainingError("rank 0 could not prepare the base (see its log)")
    return (inspect_model_folder(plan.merged) if plan.merged is not None else source), files
