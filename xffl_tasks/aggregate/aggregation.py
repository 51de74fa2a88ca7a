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
from pathlib import Path

import torch

from xffl_tasks.aggregate.engine import stream_aggregate
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


def _open_clients(
    previous: ModelFolder, names: Sequence[str], paths: Sequence[Path]
) -> list[ModelFolder]:
    clients = []
    for name, path in zip(names, paths):
        client = open_model_folder(path, label=f"client {name!r}")
        check_same_tensors(previous, client)
        clients.append(client)
    return clients


def run_aggregation(
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
    """``aggregate`` with the chunk size exposed (tests use tiny chunks)."""
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
        bytes_read, bytes_written = outcome.bytes_read, outcome.bytes_written
        previous_files = dict(outcome.input_hashes[0])
        output_files = dict(outcome.output_hashes)
        for path in _other_files(previous, previous_files):
            if path.name == REPORT_FILE:  # the previous round's report: recorded, not carried over
                previous_files[path.name], size = sha256_file(path)
            else:
                previous_files[path.name], size = copy_file(path, stage / path.name)
                output_files[path.name] = previous_files[path.name]
                bytes_written += size
            bytes_read += size
        client_files = []
        for path, hashes in zip(client_paths, outcome.input_hashes[1:]):
            files = dict(hashes)
            for other in _other_files(path, files):
                files[other.name], size = sha256_file(other)
                bytes_read += size
            client_files.append(files)
        report = build_report(
            strategy=rule,
            previous=previous,
            out=out,
            names=names,
            client_paths=client_paths,
            weights=client_weights,
            normalized=normalized,
            client_files=client_files,
            previous_files=previous_files,
            output_files=output_files,
            statistics=outcome.statistics,
            server_state_rounds=rounds,
            bytes_read=bytes_read,
            bytes_written=bytes_written,
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
        bytes_read,
        bytes_written,
    )
    return report


def aggregate(
    previous: Path,
    clients: Sequence[Path],
    out: Path,
    *,
    strategy: str = "fedavg",
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    options: Mapping[str, float] | None = None,
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
    :returns: what was written to ``out/aggregation.json``.
    :raises AggregationError: on bad input, naming the client, file, tensor or field.
    """
    return run_aggregation(
        previous, clients, out, strategy=strategy, weights=weights, names=names, options=options
    )
