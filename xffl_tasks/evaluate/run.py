"""One evaluation job: check every input, then evaluate each candidate as training would.

The number is the training task's ``val_loss_before`` for the same model, data, ``seq_len``,
``seed``, ``batch_size``, ``val_max_sequences``, precision, thread count and processes: the
same pieces run in the same order (the model folder's checks, its tokenizer, ``load_dataset``,
the runtime, every generator seeded, ``build_model`` with the adapter under PEFT's LoRA
layers, ``loop.evaluate``). Every input is checked before the process group starts, so a bad
one stops every process the same way and before anything is written.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xffl_tasks.adapter import ADAPTER_CONFIG
from xffl_tasks.data.dataset import Dataset, load_dataset
from xffl_tasks.data.tokens import tokenizer_fingerprint
from xffl_tasks.evaluate.config import EvaluationConfig
from xffl_tasks.evaluate.result import EVALUATION_FILE, FORMAT, VERSION
from xffl_tasks.launch import LaunchError, resolve_launch
from xffl_tasks.manifest import write_json_atomic
from xffl_tasks.train.checkpoint import ModelFolder, inspect_model_folder, load_tokenizer
from xffl_tasks.train.config import ConfigError
from xffl_tasks.train.recipe import resolve_seq_len, versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedCandidate:
    """A candidate checked before anything loads: the model folder the weights come from,
    the adapter applied to it (LoRA; an ``AdapterPlan``), and its validation data."""

    name: str
    source: ModelFolder
    adapter: Any
    dataset: Dataset


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _out_folder(out: str, models: list[Path], *, create: bool) -> Path:
    """``--out``, made if missing (checked writable now, not after the evaluation)."""
    folder = Path(out).absolute()
    for model in models:
        if folder.resolve() == model.resolve() or model.resolve() in folder.resolve().parents:
            raise ConfigError(f"--out {folder}: must not be a model folder or inside one ({model})")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: exists and is not a folder")
    if not create:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {folder}: cannot be made: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {folder}: cannot be written")
    return folder


def _model_folder(path: Path, *, where: str) -> ModelFolder:
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise ConfigError(
            f"{where}: {path} is a LoRA adapter folder: give its base model with --base"
        )
    try:
        return inspect_model_folder(path)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def plan_candidates(config: EvaluationConfig) -> tuple[list[PlannedCandidate], int]:
    """Every candidate checked and its data read (one tokenisation per tokenizer): the plan
    and the ``seq_len`` they share. ConfigError/DataError name the candidate and the file."""
    from xffl_tasks.train.adapter_training import plan_adapter

    settings = config.settings
    base = _model_folder(Path(config.base), where="--base") if config.base is not None else None
    sources: list[tuple[str, ModelFolder, Any]] = []
    for candidate in config.candidates:
        where = f"--candidate {candidate.name}"
        if base is None:
            sources.append((candidate.name, _model_folder(candidate.path, where=where), None))
            continue
        try:
            adapter = plan_adapter(replace(settings, adapter=str(candidate.path), peft=None))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        sources.append((candidate.name, base, adapter))
    seq_len = resolve_seq_len(settings, sources[0][1])
    fixed = replace(settings, seq_len=seq_len)
    datasets: dict[str, Dataset] = {}
    planned = []
    for name, source, adapter in sources:
        try:
            resolve_seq_len(fixed, source)
        except ConfigError as error:
            raise ConfigError(f"--candidate {name}: {error}") from None
        tokenizer = load_tokenizer(source)
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint not in datasets:
            datasets[fingerprint] = load_dataset(
                config.data, tokenizer=tokenizer, seq_len=seq_len, text_field=settings.text_field,
                val_file=settings.val_file, val_split=settings.val_split,
                val_max_sequences=settings.val_max_sequences,
            )  # fmt: skip
        planned.append(PlannedCandidate(name, source, adapter, datasets[fingerprint]))
    return planned, seq_len


def _data_description(dataset: Dataset) -> dict[str, Any]:
    """The data, briefly (counts, not file lists: evaluation.json stays small)."""
    described = dataset.description
    return {
        "path": described["path"],
        "kind": described["kind"],
        "train_files": len(described["train_files"]),
        "validation_files": len(described["validation_files"]),
        "validation_sequences": described["validation_sequences"],
    }


def run(config: EvaluationConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Evaluates every candidate of ``config``; returns evaluation.json's content (on every
    rank; rank 0 wrote it into ``config.out``)."""
    environ = dict(os.environ if environ is None else environ)
    started_at, started = _now(), time.perf_counter()
    settings = config.settings
    try:
        launch = resolve_launch(environ, master_port=settings.master_port)
    except LaunchError as error:
        raise ConfigError(f"launch environment: {error}") from None
    planned, seq_len = plan_candidates(config)
    models = [c.path for c in config.candidates] + ([Path(config.base)] if config.base else [])
    out = _out_folder(config.out, models, create=launch.is_main)

    from xffl_tasks.train import determinism, distributed
    from xffl_tasks.train.loop import evaluate

    fixed = replace(settings, seq_len=seq_len)
    runtime = distributed.resolve_runtime(fixed, launch)
    threads = distributed.set_threads(fixed, environ, launch)
    distributed.init_process_group(runtime)
    candidates: dict[str, Any] = {}
    for entry in planned:
        began = time.perf_counter()
        with determinism.repeatable(settings.seed, runtime.device):
            model, plain = distributed.build_model(entry.source, fixed, runtime, entry.adapter)
            result = evaluate(
                model, entry.dataset.validation, runtime, batch_size=settings.batch_size
            )
        del model, plain
        gc.collect()
        adapter = entry.adapter.folder if entry.adapter is not None else None
        candidates[entry.name] = {
            "val_loss": result.loss,
            "val_tokens": result.tokens,
            "val_sequences": len(entry.dataset.validation),
            "model": str(entry.source.path),
            "adapter": str(adapter) if adapter is not None else None,
            "seconds": time.perf_counter() - began,
        }
        log.info("%s: validation loss %.6f (%d tokens)", entry.name, result.loss, result.tokens)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "candidates": candidates,
        **config.evaluation_settings(),
        "seq_len": seq_len,
        "base": str(Path(config.base)) if config.base else None,
        "data": _data_description(planned[0].dataset),
        "world_size": launch.world_size,
        "launcher": launch.source,
        "device": runtime.device.type,
        "precision": runtime.precision,
        "parallelism": runtime.parallelism,
        "threads": threads,
        "versions": versions(),
        "started_at": started_at,
    }
    saved, failure = True, None
    if launch.is_main:
        try:
            record["finished_at"] = _now()
            record["seconds"] = time.perf_counter() - started
            write_json_atomic(out / EVALUATION_FILE, record)
        except OSError as error:  # every rank must learn of it first
            saved, failure = False, error
    if not distributed.broadcast_flag(saved, runtime):
        if failure is not None:
            raise failure
        raise OSError("rank 0 could not write evaluation.json; see its log")
    distributed.close_process_group()
    return record
