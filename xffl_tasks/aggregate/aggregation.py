"""``aggregate()``: the previous global model and the clients' models in, the next global model out.

Everything is checked before the first tensor byte is read: the strategy and its options, the
clients' names and weights, every safetensors header, that each client has exactly the
previous model's tensors (names, shapes, dtypes), the server state. Then one streaming pass
writes the new weights (and server state) into a staging folder beside the output, the
previous model's other files (config, generation config, tokenizer, index) are copied, the
report is written, and the folder is renamed into place. Any error leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from xffl_tasks.aggregate.engine import StreamOutcome, stream_aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.files import copy_file, sha256_file
from xffl_tasks.aggregate.model_folder import ModelFolder, check_same_tensors, open_model_folder
from xffl_tasks.aggregate.report import REPORT_FILE, build_report
from xffl_tasks.aggregate.server_state import open_server_state
from xffl_tasks.aggregate.staging import check_absent, staged_folder
from xffl_tasks.aggregate.strategies import make_strategy
from xffl_tasks.aggregate.weights import normalize, resolve_names, resolve_weights

logger = logging.getLogger(__name__)

PREVIOUS_LABEL = "previous global model"


def _check_output_location(out: Path, inputs: Sequence[Path]) -> None:
    resolved = out.resolve()
    for folder in inputs:
        if resolved.is_relative_to(folder.resolve()):
            raise AggregationError(f"output folder {out} lies inside the input folder {folder}")


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Runs torch's own operations on ``count`` threads, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _other_files(folder: Path, hashed: Mapping[str, str]) -> list[Path]:
    """The folder's top-level regular files that the streaming pass did not read."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in hashed]


@dataclass
class _Files:
    """Every file's sha256, per folder, and the bytes read and written in all."""

    previous: dict[str, str]
    clients: list[dict[str, str]]
    output: dict[str, str]
    bytes_read: int
    bytes_written: int


def _carry_and_hash_other_files(
    previous: Path, clients: Sequence[Path], stage: Path, outcome: StreamOutcome
) -> _Files:
    """Copies the previous model's other files (config, tokenizer, index) into ``stage`` and
    hashes the files of every folder that the streaming pass did not read."""
    files = _Files(
        dict(outcome.input_hashes[0]),
        [dict(hashes) for hashes in outcome.input_hashes[1:]],
        dict(outcome.output_hashes),
        outcome.bytes_read,
        outcome.bytes_written,
    )
    for path in _other_files(previous, files.previous):
        if path.name == REPORT_FILE:  # the previous round's report: recorded, not carried over
            files.previous[path.name], size = sha256_file(path)
        else:
            files.previous[path.name], size = copy_file(path, stage / path.name)
            files.output[path.name] = files.previous[path.name]
            files.bytes_written += size
        files.bytes_read += size
    for folder, hashes in zip(clients, files.clients):
        for path in _other_files(folder, hashes):
            hashes[path.name], size = sha256_file(path)
            files.bytes_read += size
    return files


def _open_clients(
    previous: ModelFolder, names: Sequence[str], paths: Sequence[Path]
) -> list[ModelFolder]:
    clients = []
    for name, path in zip(names, paths):
        client = open_model_folder(path, label=f"client {name!r}")
        check_same_tensors(previous, client)
        clients.append(client)
    return clients


def aggregate(
    previous: Path,
    clients: Sequence[Path],
    out: Path,
    *,
    strategy: str = "fedavg",
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    options: Mapping[str, float] | None = None,
    chunk_elements: int | None = None,
) -> dict:
    """Aggregates the client model folders into the next global model at ``out``.

    :param previous: the previous global model's folder (its layout is kept; its server state,
        if any, is read from ``server_state/``).
    :param clients: the clients' model folders (Hugging Face, safetensors, with metrics.json).
    :param out: the new folder; must not exist. It appears only complete.
    :param strategy: fedavg, fedavgm, fedadam, fedyogi, trimmed-mean or median.
    :param weights: one positive weight per client; default: each metrics.json's num_samples.
    :param names: the clients' names in the report and in messages; default: folder names.
    :param options: the strategy's hyperparameters (e.g. server_learning_rate).
    :param chunk_elements: elements per chunk; by default sized to the memory budget (tests
        use tiny chunks to cross chunk boundaries everywhere).
    :returns: what was written to ``out/aggregation.json``.
    :raises AggregationError: on bad input, naming the client, file, tensor or field.
    """
    started = time.perf_counter()
    previous, out = Path(previous), Path(out)
    client_paths = [Path(client) for client in clients]
    if not client_paths:
        raise AggregationError("no client folders: give at least one")
    names = resolve_names(client_paths, names)
    check_absent(out)
    _check_output_location(out, [previous, *client_paths])
    rule = make_strategy(strategy, options=options, num_clients=len(client_paths))
    client_weights = resolve_weights(names, client_paths, weights)
    previous_model = open_model_folder(previous, label=PREVIOUS_LABEL)
    client_models = _open_clients(previous_model, names, client_paths)
    floating = [
        e for shard in previous_model.shards for e in shard.header.tensors if e.dtype.floating
    ]
    state = open_server_state(previous, rule, floating)
    rounds = (state.rounds if state else 0) + 1 if rule.state_names else None
    normalized = normalize([w.weight for w in client_weights])
    logger.info(
        "aggregating %s clients (%s) with %s into %s", len(names), ", ".join(names), rule.name, out
    )
    with staged_folder(out) as stage:
        with _torch_threads(1):
            outcome = stream_aggregate(
                previous=previous_model,
                clients=client_models,
                strategy=rule,
                weights=normalized,
                state=state,
                rounds=rounds or 0,
                stage=stage,
                chunk_elements=chunk_elements,
            )
        files = _carry_and_hash_other_files(previous, client_paths, stage, outcome)
        report = build_report(
            strategy=rule,
            previous=previous,
            out=out,
            names=names,
            client_paths=client_paths,
            weights=client_weights,
            normalized=normalized,
            client_files=files.clients,
            previous_files=files.previous,
            output_files=files.output,
            statistics=outcome.statistics,
            server_state_rounds=rounds,
            bytes_read=files.bytes_read,
            bytes_written=files.bytes_written,
            seconds=time.perf_counter() - started,
        )
        with open(stage / REPORT_FILE, "x", encoding="utf-8") as file:
            file.write(json.dumps(report, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
    logger.info(
        "aggregated into %s in %.1f s: global update norm %.6g, %s bytes read, %s written",
        out,
        report["seconds"],
        report["global_update_norm"],
        report["bytes_read"],
        report["bytes_written"],
    )
    return report
