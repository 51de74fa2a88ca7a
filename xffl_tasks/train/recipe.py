"""One training run, start to end: check the inputs, set up, evaluate, train, evaluate,
save, record. Every input is checked before the process group starts, so a bad input stops
every process the same way, and before any output is written."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Mapping
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

from xffl_tasks.data.dataset import load_dataset
from xffl_tasks.launch import LaunchError, resolve_launch
from xffl_tasks.train.checkpoint import (
    CONTEXT_KEYS,
    ModelFolder,
    OutputFolder,
    alias_groups,
    inspect_model_folder,
    load_tokenizer,
    state_dict_for_output,
    write_model,
)
from xffl_tasks.train.config import ConfigError, TrainingConfig, TrainingError
from xffl_tasks.train.dp_options import DP_SGD, check_dp_options

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQ_LEN = 2048


def resolve_seq_len(config: TrainingConfig, source: ModelFolder) -> int:
    """``seq_len``, or the model's context (at most 2048); beyond the model's context is an error."""
    context = source.context_length
    seq_len = config.seq_len or min(context or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if context is not None and seq_len > context:
        key = next(k for k in CONTEXT_KEYS if source.config.get(k) == context)
        raise ConfigError(
            f"seq_len: {seq_len} is beyond the model's context of {context} tokens ({key} in {source.path / 'config.json'})"
        )
    return seq_len


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torch
    import transformers

    import xffl_tasks

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "xffl_tasks": xffl_tasks.__version__,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(config: TrainingConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.data`` into ``config.out``; returns the metrics
    (on every rank; rank 0 wrote them)."""
    environ = dict(os.environ if environ is None else environ)
    started_at, started = _now(), time.perf_counter()
    config.require_paths()
    try:
        launch = resolve_launch(environ, master_port=config.master_port)
    except LaunchError as error:
        raise ConfigError(f"launch environment: {error}") from None
    source = inspect_model_folder(config.model)
    seq_len = resolve_seq_len(config, source)
    output = OutputFolder(config.out, model=source.path)
    from xffl_tasks.train.adapter_training import adapter_state, plan_adapter, write_adapter

    adapter = plan_adapter(config)  # None: the whole model trains
    from xffl_tasks.train.stacked_base import plan_stacked_base, prepare_base

    stacked = plan_stacked_base(config)  # lora-stacked: the base merged and checked first
    if adapter is not None and adapter.folder is not None:
        OutputFolder(config.out, model=adapter.folder)  # nor inside the adapter
    tokenizer = load_tokenizer(source)
    dataset = load_dataset(
        config.data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        text_field=config.text_field,
        val_file=config.val_file,
        val_split=config.val_split,
        val_max_sequences=config.val_max_sequences,
    )

    from xffl_tasks.train import determinism, distributed
    from xffl_tasks.train.loop import evaluate, train
    from xffl_tasks.train.schedule import plan_steps

    plan = plan_steps(
        num_sequences=len(dataset.train),
        world_size=launch.world_size,
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        epochs=config.epochs,
        max_steps=config.max_steps,
        seq_len=seq_len,
    )
    runtime = distributed.resolve_runtime(config, launch)
    check_dp_options(config)
    private = None  # --dp-mode dp-sgd: Opacus's DP-SGD (xffl_tasks.train.privacy, docs/privacy.md)
    if config.dp_mode == DP_SGD:
        from xffl_tasks.train.privacy import PrivateRun

        private = PrivateRun.prepare(
            config, num_sequences=len(dataset.train), step_plan=plan,
            world_size=launch.world_size, environ=environ,
        )  # fmt: skip
        runtime = private.runtime(runtime)
    threads = distributed.set_threads(config, environ, launch)
    log.info(
        "training %s on %s: %d training and %d validation sequences of %d tokens, %d steps, "
        "%d process(es) (%s), %s, %s, %d thread(s)",
        source.path, dataset.description["path"], len(dataset.train), len(dataset.validation), seq_len,
        plan.total_steps, launch.world_size, launch.source, runtime.device, runtime.precision, threads,
    )  # fmt: skip
    if launch.is_main:
        output.create()
    settings = ExitStack()  # the run's process-wide settings, undone at its end
    try:
        distributed.init_process_group(runtime)
        base_files = None
        if stacked is not None:  # rank 0 merges the round's update (or checks the base)
            source, base_files = prepare_base(stacked, source, runtime)
        # every generator seeded before the model is built (a new adapter's A draws from it)
        settings.enter_context(determinism.repeatable(config.seed, runtime.device))
        build = private.build_model if private is not None else distributed.build_model
        model, plain = build(source, config, runtime, adapter)
        aliases = alias_groups(plain)
        # --dp-withhold-validation: no validation pass at all (its losses would leave in the log)
        validates = private is None or not config.dp_withhold_validation
        val_tokens = len(dataset.validation) * (seq_len - 1)  # what evaluate counts
        before = after = None
        if validates:
            before = evaluate(model, dataset.validation, runtime, batch_size=config.batch_size)
            val_tokens = before.tokens
            log.info("validation loss before training: %.4f (%d tokens)", before.loss, val_tokens)
        if private is not None:
            result = private.train(model, dataset.train, plan, config, runtime)
        else:
            result = train(model, dataset.train, plan, config, runtime)
        if validates:
            after = evaluate(model, dataset.validation, runtime, batch_size=config.batch_size)
            log.info("validation loss after training: %.4f", after.loss)
        state = distributed.full_state_dict(
            model, plain, runtime, staging=output.staging, adapter_only=adapter is not None
        )
        metrics = {
            "num_samples": result.num_samples,
            "num_tokens": result.num_tokens,
            "val_loss_before": before.loss if before is not None else None,
            "val_loss_after": after.loss if after is not None else None,
            "val_tokens": val_tokens,
            "val_sequences": len(dataset.validation),
            "train_loss": result.train_loss,
            "train_loss_last": result.train_loss_last,
            "train_loss_curve": result.loss_curve[1],
            "train_loss_curve_every": result.loss_curve[0],
            "train_sequences": len(dataset.train),
            "epochs": result.num_samples / len(dataset.train),
            "steps": result.steps,
            "seconds": result.seconds,
            "cpu_seconds": result.cpu_seconds,
            "step_seconds_median": result.step_seconds_median,
            "tokens_per_second": result.num_tokens / result.seconds if result.seconds > 0 else 0.0,
            "learning_rate_last": result.learning_rate_last,
            "world_size": launch.world_size,
            "launcher": launch.source,
            "device": runtime.device.type,
            "precision": runtime.precision,
            "parallelism": runtime.parallelism,
            "threads": threads,
            "seed": config.seed,
            "seq_len": seq_len,
            "model": str(source.path),
            "data": dataset.description,
            "hyperparameters": config.hyperparameters(),
            "versions": versions(),
            "started_at": started_at,
        }
        if base_files:  # the base trained on (lora-stacked, --base-hashes): the files' sha256
            metrics["base_sha256"] = base_files
        if private is not None:  # only what leaves under DP, and the run's DP-SGD parameters
            metrics = private.release(metrics, seq_len=seq_len)
        saved, failure = True, None
        if launch.is_main:
            try:
                assert output.staging is not None
                if adapter is not None:
                    write_adapter(
                        output.staging, adapter_state(plain, state, adapter), adapter, source
                    )
                else:
                    write_model(
                        output.staging,
                        model=plain,
                        state=state_dict_for_output(state, source, aliases),
                        tokenizer=tokenizer,
                        source=source,
                        max_shard_size=config.max_shard_size,
                    )
                metrics["total_seconds"] = time.perf_counter() - started
                metrics["finished_at"] = _now()
                output.commit(metrics)
            except Exception as error:  # noqa: BLE001 - every rank must learn of it first
                saved, failure = False, error
        if not distributed.broadcast_flag(saved, runtime):
            if failure is not None:
                raise failure
            raise TrainingError("rank 0 could not write the output; see its log")
        del model  # a DDP wrapper holds the process group: released before the group goes
        distributed.close_process_group()
        log.info(
            "wrote %s: %d steps, %d samples, %.0f tokens/s",
            output.out,
            result.steps,
            metrics["num_samples"],  # a dp-sgd run's: the expected count (the log leaves too)
            metrics["tokens_per_second"],
        )
        return metrics
    finally:
        settings.close()
        output.discard()
