"""``aggregate()``: the previous global model and the clients' models in, the next global model out.

Everything is checked before the first tensor byte is read: the strategy and its options, the
clients' names and weights, every safetensors header, that each client has exactly the
previous model's tensors (names, shapes, dtypes), the server state. A client that fails its
own checks (metrics, headers, tensors, NaN or Inf found during the pass) is left out with its
reason, as long as ``min_clients`` remain; a pass that finds NaN or Inf starts again without
the client, from a fresh staging folder. Then one streaming pass
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

from xffl_tasks.aggregate.client_check import client_weight, open_client_model
from xffl_tasks.aggregate.client_order import by_name
from xffl_tasks.aggregate.engine import NonFiniteClients, StreamOutcome, stream_aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.files import copy_file, sha256_file
from xffl_tasks.aggregate.input_hashes import COMPUTED, GIVEN, HashBook
from xffl_tasks.aggregate.inputs import check_client_inputs
from xffl_tasks.aggregate.lora_options import ADAPTER_STRATEGIES, RENAMED_STRATEGIES
from xffl_tasks.aggregate.model_folder import ModelFolder, open_model_folder
from xffl_tasks.aggregate.report import REPORT_FILE, build_report
from xffl_tasks.aggregate.server_state import ServerState, open_server_state
from xffl_tasks.aggregate.staging import staged_folder
from xffl_tasks.aggregate.strategies import Strategy, make_strategy
from xffl_tasks.aggregate.update_bounds import (
    BoundOutcome,
    NormBound,
    apply_norm_bound,
    check_max_samples,
    check_norm_bound,
)
from xffl_tasks.aggregate.update_norms import update_norms
from xffl_tasks.aggregate.weights import (
    ClientWeight,
    check_given_weights,
    normalize,
)

logger = logging.getLogger(__name__)

PREVIOUS_LABEL = "previous global model"


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
    #: Per folder (previous first, then the clients): ``given`` or ``computed``, by name.
    sources: list[dict[str, str]]


def _hash_other_file(path: Path, given: HashBook) -> tuple[str, int, str]:
    """The file's sha256, the bytes read for it and where the hash came from."""
    with open(path, "rb") as file:
        known = given.lookup(path, os.fstat(file.fileno()))
    if known:
        return known, 0, GIVEN
    digest, size = sha256_file(path)
    return digest, size, COMPUTED


def _carry_and_hash_other_files(
    previous: Path, clients: Sequence[Path], stage: Path, outcome: StreamOutcome, given: HashBook
) -> _Files:
    """Copies the previous model's other files (config, tokenizer, index) into ``stage`` and
    hashes the files of every folder that the streaming pass did not read (unless given)."""
    files = _Files(
        dict(outcome.input_hashes[0]),
        [dict(hashes) for hashes in outcome.input_hashes[1:]],
        dict(outcome.output_hashes),
        outcome.bytes_read,
        outcome.bytes_written,
        [dict(sources) for sources in outcome.hash_sources],
    )
    for path in _other_files(previous, files.previous):
        if path.name == REPORT_FILE:  # the previous round's report: recorded, not carried over
            files.previous[path.name], size, files.sources[0][path.name] = _hash_other_file(
                path, given
            )
        else:  # read anyway to be copied: hashed on the way
            files.previous[path.name], size = copy_file(path, stage / path.name)
            files.sources[0][path.name] = COMPUTED
            files.output[path.name] = files.previous[path.name]
            files.bytes_written += size
        files.bytes_read += size
    for folder, hashes, sources in zip(clients, files.clients, files.sources[1:]):
        for path in _other_files(folder, hashes):
            hashes[path.name], size, sources[path.name] = _hash_other_file(path, given)
            files.bytes_read += size
    return files


@dataclass
class _Client:
    name: str
    path: Path
    weight: ClientWeight
    model: ModelFolder


def _check_clients(
    previous: ModelFolder,
    names: Sequence[str],
    paths: Sequence[Path],
    given: Sequence[ClientWeight] | None,
    max_samples: Sequence[int | None],
    rejected: dict[str, str],
) -> list[_Client]:
    """The clients whose metrics, headers and tensors pass (``client_check``, as the pull
    checks them); the others go to ``rejected``."""
    clients = []
    for index, (name, path) in enumerate(zip(names, paths)):
        try:
            mine = given[index] if given is not None else None
            weight = client_weight(path, name, mine, max_samples[index])
            model = open_client_model(previous, path, name)
        except AggregationError as error:
            _reject(rejected, name, str(error))
            continue
        clients.append(_Client(name, path, weight, model))
    return clients


def _bound_norms(
    previous: ModelFolder, accepted: list[_Client], bound: NormBound, rejected: dict[str, str]
) -> tuple[list[_Client], BoundOutcome | None]:
    """The norm bound applied (a first pass computing every update norm): the clients kept,
    and what was clipped or refused. NaN or Inf found on the way leaves a client out."""
    norms = update_norms(previous, [client.model for client in accepted])
    kept = []
    for client, result in zip(accepted, norms):
        if result.problem is not None:
            _reject(rejected, client.name, f"{client.model.label}: {result.problem}")
        else:
            kept.append((client, result.norm))
    if not kept:
        return [], None
    outcome = apply_norm_bound({client.name: norm for client, norm in kept}, bound)
    for name, reason in outcome.refused.items():
        _reject(rejected, name, reason)
    return [client for client, _ in kept if client.name not in outcome.refused], outcome


def _reject(rejected: dict[str, str], name: str, reason: str) -> None:
    logger.info("client %r fails its checks: %s", name, reason)
    rejected[name] = reason


def _check_enough(accepted: int, total: int, min_clients: int, rejected: Mapping[str, str]) -> None:
    if accepted < min_clients:
        raise AggregationError(
            f"only {accepted} of {total} clients passed the checks, min_clients is {min_clients}; "
            + "; ".join(rejected.values())
        )


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
    min_clients: int | None = None,
    max_weight_share: float | None = None,
    input_hashes: Mapping[str | os.PathLike, Mapping[str, object]] | HashBook | None = None,
    max_samples: Sequence[int | None] | None = None,
    norm_bound: float | None = None,
    norm_bound_action: str = "clip",
) -> dict:
    """Aggregates the client model folders into the next global model at ``out``.

    A client whose metrics.json, safetensors headers or tensors (names, shapes, dtypes) fail
    the checks, or whose weights hold NaN or Inf, is left out with its reason (the report's
    ``rejected``); nothing of it reaches the output. Fewer than ``min_clients`` left is an
    error listing every reason.

    :param previous: the previous global model's folder (its layout is kept; its server state,
        if any, is read from ``server_state/``).
    :param clients: the clients' model folders (Hugging Face, safetensors, with metrics.json),
        in any order: they are aggregated, and reported, in the order of their names
        (``client_order``), so that the same clients always give the same bytes.
    :param out: the new folder; must not exist. It appears only complete.
    :param strategy: fedavg, fedavgm, fedadam, fedyogi, trimmed-mean or median; for LoRA
        adapter folders lora-fedavg, lora-svd or lora-frozen-a (``xffl_tasks.aggregate.lora``),
        or lora-stacked (``xffl_tasks.aggregate.lora_stacked``: ``previous`` is then the round's
        canonical base model, or the previous lora-stacked output, and ``out`` receives the
        stacked update and the next canonical base).
    :param weights: one positive weight per client; default: each metrics.json's num_samples.
    :param names: the clients' names in the report and in messages; default: folder names.
    :param options: the strategy's hyperparameters (e.g. server_learning_rate).
    :param chunk_elements: elements per chunk; by default sized to the memory budget (tests
        use tiny chunks to cross chunk boundaries everywhere).
    :param min_clients: how many clients must pass the checks; default: all of them.
    :param max_weight_share: the largest normalised weight a client may get (0 < x <= 1); the
        excess goes to the others in proportion to their weights. Default: no cap.
    :param input_hashes: hashes of input files computed elsewhere (the transfer that fetched
        them): path -> ``{"sha256", "size", "mtime_ns"}``. A file whose size and mtime still
        match is not hashed again; any other is (the report's ``input_hashes`` says which).
    :param max_samples: per client (in the order of ``clients``), the most num_samples its
        metrics.json may claim, or None; a client claiming more is left out (``update_bounds``).
    :param norm_bound: a multiplier ``k``: a client whose update norm is above ``k`` times the
        median client norm is clipped to that limit or refused (``norm_bound_action``: clip or
        refuse); the report's ``norm_bound`` says which, with every norm. Default: no bound.
    :returns: what was written to ``out/aggregation.json``.
    :raises AggregationError: on bad input, naming the client, file, tensor or field.
    """
    bound = check_norm_bound(norm_bound, norm_bound_action)
    if strategy in RENAMED_STRATEGIES:
        raise AggregationError(RENAMED_STRATEGIES[strategy])
    if strategy == "lora-stacked":  # the facilities' factors stacked, merged into the base
        from xffl_tasks.aggregate.lora_stacked import aggregate_stacked

        if bound is not None:
            raise AggregationError("norm_bound is not offered by lora-stacked yet")

        return aggregate_stacked(
            previous, clients, out, weights=weights, names=names, options=options,
            min_clients=min_clients, max_weight_share=max_weight_share, max_samples=max_samples,
        )  # fmt: skip
    if strategy in ADAPTER_STRATEGIES:  # LoRA adapter folders: xffl_tasks.aggregate.lora
        from xffl_tasks.aggregate.lora import aggregate_adapters

        return aggregate_adapters(
            previous, clients, out, strategy=strategy, weights=weights, names=names,
            options=options, min_clients=min_clients, max_weight_share=max_weight_share,
            max_samples=max_samples, norm_bound=bound,
        )  # fmt: skip
    started = time.perf_counter()
    previous, out = Path(previous), Path(out)
    client_paths, names, min_clients = check_client_inputs(
        previous, clients, out, names=names, min_clients=min_clients,
        max_weight_share=max_weight_share,
    )  # fmt: skip
    make_strategy(strategy, options=options, num_clients=len(client_paths))
    book = (
        input_hashes if isinstance(input_hashes, HashBook) else HashBook.from_mapping(input_hashes)
    )
    given = check_given_weights(names, weights) if weights is not None else None
    bounds = check_max_samples(max_samples, len(names))
    names, client_paths, per_client = by_name(  # sums in a fixed order
        names, client_paths, list(zip(given or [None] * len(names), bounds))
    )
    given = [weight for weight, _ in per_client] if given is not None else None
    bounds = [bound for _, bound in per_client]
    previous_model = open_model_folder(previous, label=PREVIOUS_LABEL)
    rejected: dict[str, str] = {}
    accepted = _check_clients(previous_model, names, client_paths, given, bounds, rejected)
    bounded = None
    if bound is not None:  # a first pass computing every update norm
        accepted, bounded = _bound_norms(previous_model, accepted, bound, rejected)
    floating = [
        e for shard in previous_model.shards for e in shard.header.tensors if e.dtype.floating
    ]
    while True:
        _check_enough(len(accepted), len(names), min_clients, rejected)
        rule = make_strategy(strategy, options=options, num_clients=len(accepted))
        state = open_server_state(previous, rule, floating)
        rounds = (state.rounds if state else 0) + 1 if rule.state_names else None
        normalized = normalize([c.weight.weight for c in accepted], max_weight_share)
        logger.info(
            "aggregating %s clients (%s) with %s into %s",
            len(accepted),
            ", ".join(c.name for c in accepted),
            rule.name,
            out,
        )
        try:
            report = _aggregate_pass(
                previous_model, accepted, rule, state, rounds, normalized, out, chunk_elements,
                started=started, rejected=rejected, min_clients=min_clients,
                max_weight_share=max_weight_share, given_hashes=book, bounded=bounded,
                max_samples=dict(zip(names, bounds)) if max_samples is not None else None,
            )  # fmt: skip
            break
        except NonFiniteClients as error:  # the staged output is gone: start again without them
            for index, reason in error.clients.items():
                _reject(rejected, accepted[index].name, f"{accepted[index].model.label}: {reason}")
            accepted = [c for i, c in enumerate(accepted) if i not in error.clients]
    for name, reason in rejected.items():
        logger.warning("client %r was left out of the aggregation: %s", name, reason)
    logger.info(
        "aggregated into %s in %.1f s: global update norm %.6g, %s bytes read, %s written",
        out,
        report["seconds"],
        report["global_update_norm"],
        report["bytes_read"],
        report["bytes_written"],
    )
    return report


def _aggregate_pass(
    previous_model: ModelFolder,
    accepted: Sequence[_Client],
    rule: Strategy,
    state: ServerState | None,
    rounds: int | None,
    normalized: Sequence[float],
    out: Path,
    chunk_elements: int | None,
    *,
    started: float,
    rejected: Mapping[str, str],
    min_clients: int,
    max_weight_share: float | None,
    given_hashes: HashBook,
    bounded: BoundOutcome | None,
    max_samples: Mapping[str, int | None] | None,
) -> dict:
    """One streaming pass into a staging folder renamed to ``out`` once complete."""
    previous = previous_model.path
    given_hashes.stale.clear()  # a pass started again records them afresh
    with staged_folder(out) as stage:
        with _torch_threads(1):
            outcome = stream_aggregate(
                previous=previous_model,
                clients=[c.model for c in accepted],
                strategy=rule,
                weights=normalized,
                state=state,
                rounds=rounds or 0,
                stage=stage,
                chunk_elements=chunk_elements,
                given_hashes=given_hashes,
                scales=[bounded.scales.get(c.name, 1.0) for c in accepted] if bounded else None,
            )
        files = _carry_and_hash_other_files(
            previous, [c.path for c in accepted], stage, outcome, given_hashes
        )
        report = build_report(
            strategy=rule,
            previous=previous,
            out=out,
            names=[c.name for c in accepted],
            client_paths=[c.path for c in accepted],
            weights=[c.weight for c in accepted],
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
        for entry, sources in zip(report["clients"], files.sources[1:]):
            entry["hash_sources"] = dict(sorted(sources.items()))
        report["previous_hash_sources"] = dict(sorted(files.sources[0].items()))
        every = [source for sources in files.sources for source in sources.values()]
        report["input_hashes"] = {
            GIVEN: every.count(GIVEN),
            COMPUTED: every.count(COMPUTED),
            "stale": sorted(set(given_hashes.stale)),
        }
        report["rejected"] = dict(rejected)
        report["min_clients"] = min_clients
        report["max_weight_share"] = max_weight_share
        report["max_samples"] = dict(max_samples) if max_samples is not None else None
        report["norm_bound"] = bounded.report() if bounded is not None else None
        with open(stage / REPORT_FILE, "x", encoding="utf-8") as file:
            file.write(json.dumps(report, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
    return report
