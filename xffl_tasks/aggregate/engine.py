"""The streaming pass: every tensor, chunk by chunk, from the inputs straight into the output files.

Tensors are taken in the previous global model's layout (shard by shard, in data order) and
looked up by name in each client, however the client is sharded. Each output shard starts with
the previous shard's header, verbatim (same names, dtypes, shapes, offsets), followed by the
new bytes of each tensor in order; each server-state file likewise. So one pass reads every
input once and writes every output once, with a fixed set of buffers: memory depends on the
chunk size, not on the model's size or the number of clients.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from xffl_tasks.aggregate.arithmetic import (
    ChunkArithmetic,
    ChunkResult,
    UpdateStatistics,
    element_index,
    fused_kernel,
)
from xffl_tasks.aggregate.chunk_loader import ChunkLoader, ChunkTask, LoadedChunk, Read
from xffl_tasks.aggregate.errors import AggregationError, NonFiniteClients
from xffl_tasks.aggregate.files import InputFile, OutputFile
from xffl_tasks.aggregate.input_hashes import HashBook
from xffl_tasks.aggregate.model_folder import ModelFolder, TensorLocation
from xffl_tasks.aggregate.safetensors_format import SafetensorsHeader
from xffl_tasks.aggregate.server_state import (
    STATE_FOLDER,
    ServerState,
    state_dtype,
    state_file,
    state_header,
)
from xffl_tasks.aggregate.strategies import Strategy
from xffl_tasks.aggregate.writeback import WriteBack

#: Bytes of buffers the pass may use; the chunk size follows from it.
DEFAULT_MEMORY_BUDGET = 160 << 20
MIN_CHUNK_ELEMENTS = 1 << 12
#: The torch arithmetic works in float32 copies that should stay in the caches; the fused
#: kernels read the slot once, and bigger chunks only cut the per-chunk overhead.
MAX_CHUNK_ELEMENTS = 1 << 18
MAX_FUSED_CHUNK_ELEMENTS = 1 << 20
#: Threads doing the arithmetic, each on a chunk of its own.
COMPUTE_THREADS = 2
#: Chunks whose buffers circulate: one being read, one waiting, the ones being computed.
SLOTS = COMPUTE_THREADS + 2
#: Threads hashing the files read out of order, a file at a time.
HASH_THREADS = 2


def choose_chunk_elements(
    *,
    clients: int,
    states: int,
    itemsize: int,
    scratch_per_client: int = 0,
    budget: int = DEFAULT_MEMORY_BUDGET,
    fused: bool = False,
) -> int:
    """Elements per chunk so that every buffer of the pass fits in ``budget`` bytes.

    Per element and per slot: the bytes read for the previous model, each client
    (``itemsize``) and each state; float32 working copies of the previous model and each
    client's update, the strategy's scratch, the change, the new states and the output. The
    fused kernels (``fused``) need only the output beside the reads.
    """
    compute = 4 if itemsize <= 4 else 8
    reads = (1 + clients) * itemsize + states * compute
    if fused:
        per_element = SLOTS * (reads + itemsize)
        return max(MIN_CHUNK_ELEMENTS, min(MAX_FUSED_CHUNK_ELEMENTS, budget // per_element))
    work = (1 + clients * (1 + scratch_per_client) + 3 + 2 * states) * compute + itemsize
    per_element = SLOTS * (reads + work)
    return max(MIN_CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, budget // per_element))


def split(count: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(first, count) of the chunks covering ``count`` elements (none for an empty tensor)."""
    for first in range(0, count, chunk):
        yield first, min(chunk, count - first)


def non_finite_clients(chunk: LoadedChunk, clients: int) -> dict[int, str]:
    """The clients whose values in ``chunk`` hold NaN or Inf (none if the previous model does).

    Only called once the arithmetic has found a non-finite value: the common case pays nothing.
    """
    found = {}
    tensor = chunk.task.tensor
    if not tensor.dtype.floating:
        return found
    for source in range(1 + clients):
        values = chunk.tensor(source).float()  # isfinite has no float8 kernels
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            continue
        if source == 0:
            return {}
        position = int(bad.nonzero()[0, 0])
        index = element_index(tensor.shape, chunk.task.first + position)
        found[source - 1] = (
            f"tensor {tensor.name!r} holds {values[position].item()} at index {index} "
            "(NaN or Inf in the weights)"
        )
    return found


@dataclass(frozen=True)
class StreamOutcome:
    statistics: UpdateStatistics
    #: Per folder (previous first, then the clients): its weight files' sha256, by name.
    input_hashes: list[dict[str, str]]
    #: Per folder likewise: where each hash came from, ``given`` or ``computed``.
    hash_sources: list[dict[str, str]]
    #: The files written (weights and server state): sha256 by relative name.
    output_hashes: dict[str, str]
    bytes_read: int
    bytes_written: int


def files_read_in_order(locations: Iterable[TensorLocation]) -> set[str]:
    """The files that reading whole tensors at ``locations``, in this order, reads front to back."""
    files: set[str] = set()
    out_of_order: set[str] = set()
    last_begin: dict[str, int] = {}
    for location in locations:
        file = location.shard.file
        files.add(file)
        if location.entry.begin < last_begin.get(file, -1):
            out_of_order.add(file)
        last_begin[file] = location.entry.begin
    return files - out_of_order


class _Lanes:
    """A thread per file hashing it in order: the files' hashes run side by side, on every core."""

    def __init__(self) -> None:
        self.executors: list[ThreadPoolExecutor] = []

    def new(self) -> ThreadPoolExecutor:
        self.executors.append(ThreadPoolExecutor(1, thread_name_prefix="aggregate-hash-lane"))
        return self.executors[-1]

    def close(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True, cancel_futures=True)


class _Inputs:
    """The input files, each opened once per folder: a hash given (and still valid), or hashed
    on the fly by a lane of its own, or, read out of order, by the hasher threads."""

    def __init__(self, given: HashBook | None = None) -> None:
        self.files: dict[tuple[int, Path], InputFile] = {}
        self.names: dict[tuple[int, Path], str] = {}
        self.stop = threading.Event()
        self.hasher = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="aggregate-hash")
        self.lanes = _Lanes()
        self.given = given

    def open(self, folder: int, label: str, locations: Sequence[TensorLocation]) -> None:
        """Opens the files of ``locations``: folder ``folder``'s tensors, in processing order."""
        in_order = files_read_in_order(locations)
        for shard in {location.shard.file: location.shard for location in locations}.values():
            self.files[folder, shard.path] = InputFile(
                path=shard.path,
                header=shard.header.header_bytes,
                label=f"{label}: {shard.file}",
                hash_inline=shard.file in in_order,
                hasher=self.hasher,
                stop=self.stop,
                lane=self.lanes.new() if shard.file in in_order else None,
                given=self.given,
            )
            self.names[folder, shard.path] = shard.file

    def read(self, folder: int, location: TensorLocation, first: int, count: int) -> Read:
        dtype = location.entry.dtype
        file = self.files[folder, location.shard.path]
        return Read(file, location.offset + first * dtype.itemsize, dtype, count)

    def hashes(self, folders: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Per folder, the sha256 of each file by its name in the folder, and its source."""
        hashes: list[dict[str, str]] = [{} for _ in range(folders)]
        sources: list[dict[str, str]] = [{} for _ in range(folders)]
        for key, file in self.files.items():
            hashes[key[0]][self.names[key]] = file.sha256()
            sources[key[0]][self.names[key]] = file.hash_source
        return hashes, sources

    def close(self) -> None:
        self.stop.set()
        self.hasher.shutdown(wait=True, cancel_futures=True)
        self.lanes.close()
        for file in self.files.values():
            file.close()


class _Outputs:
    """The output files: the model's shards (headers copied) and the new server state."""

    def __init__(self, stage: Path, previous: ModelFolder, strategy: Strategy, rounds: int):
        self.writeback = WriteBack()
        self.lanes = _Lanes()
        self.files: dict[str, OutputFile] = {}
        self.model: dict[str, OutputFile] = {}
        self.state: list[OutputFile] = []
        try:
            for shard in previous.shards:
                self.model[shard.file] = self._create(stage, shard.file, shard.header)
            if strategy.state_names:
                tensors = [e for s in previous.shards for e in s.header.tensors if e.dtype.floating]
                (stage / STATE_FOLDER).mkdir()
                for name in strategy.state_names:
                    header = state_header(strategy, name, tensors, rounds)
                    self.state.append(self._create(stage, state_file(name), header))
        except BaseException:
            self.abandon()
            raise

    def _create(self, stage: Path, relative: str, header: SafetensorsHeader) -> OutputFile:
        output = OutputFile(
            path=stage / relative,
            header=header.header_bytes,
            size=header.file_size,
            writeback=self.writeback,
            lane=self.lanes.new(),
        )
        self.files[relative] = output
        return output

    def close(self) -> dict[str, str]:
        """Fsyncs and closes every file; returns their sha256 by relative name."""
        self.writeback.drain()
        self.writeback.close()
        try:
            return {name: output.close() for name, output in self.files.items()}
        finally:
            self.lanes.close()

    def abandon(self) -> None:
        self.writeback.drain()
        self.writeback.close()
        self.lanes.close()
        for output in self.files.values():
            output.abandon()


def stream_aggregate(
    *,
    previous: ModelFolder,
    clients: Sequence[ModelFolder],
    strategy: Strategy,
    weights: Sequence[float],
    state: ServerState | None,
    rounds: int,
    stage: Path,
    chunk_elements: int | None = None,
    given_hashes: HashBook | None = None,
    scales: Sequence[float] | None = None,
) -> StreamOutcome:
    """Aggregates into ``stage``: the model's shards, and the server state if the strategy keeps one.

    ``weights`` are normalised; ``state`` is the previous round's (None: zeros); ``rounds``
    goes into the new state's metadata; ``given_hashes`` spare the hashing of the files whose
    size and mtime still match; ``scales`` multiply each client's update (the norm bound's
    clipping; None: ones). Raises ``NonFiniteClients`` when clients' weights hold NaN or Inf
    (found by the arithmetic's own finiteness check of each update's squared norm), or when
    finite values of theirs make the output non-finite, so that the caller can drop them and
    start the pass again.
    """
    order = [entry for shard in previous.shards for entry in shard.header.tensors]
    shard_of = {
        entry.name: shard.file for shard in previous.shards for entry in shard.header.tensors
    }
    states = len(strategy.state_names)
    itemsize = max((entry.dtype.itemsize for entry in order), default=1)
    scaled = scales is not None and any(scale != 1.0 for scale in scales)
    fused = not scaled and all(
        fused_kernel(strategy, entry.dtype.name) for entry in order if entry.dtype.floating
    )
    if chunk_elements is None:
        chunk_elements = choose_chunk_elements(
            clients=len(clients),
            states=states,
            itemsize=itemsize,
            scratch_per_client=strategy.scratch_per_client,
            fused=fused,
        )
    folders = [previous, *clients]
    inputs = _Inputs(given_hashes)
    outputs: _Outputs | None = None
    try:
        outputs = _Outputs(stage, previous, strategy, rounds)
        for index, folder in enumerate(folders):
            inputs.open(index, folder.label, [folder.tensors[entry.name] for entry in order])
        if state:
            floating = [entry for entry in order if entry.dtype.floating]
            for locations in zip(*(state.locations(entry.name) for entry in floating)):
                inputs.open(0, previous.label, locations)

        def tasks() -> Iterator[ChunkTask]:
            for entry in order:
                locations = [(i, folder.tensors[entry.name]) for i, folder in enumerate(folders)]
                if entry.dtype.floating and state:
                    locations += [(0, location) for location in state.locations(entry.name)]
                zeros = states if entry.dtype.floating and not state else 0  # the first round
                for first, count in split(entry.numel, chunk_elements):
                    reads = [inputs.read(i, location, first, count) for i, location in locations]
                    reads += [Read(None, 0, state_dtype(entry), count)] * zeros
                    yield ChunkTask(entry, first, count, tuple(reads))

        state_itemsize = 8 if any(e.dtype.name == "F64" for e in order) else 4
        slot_bytes = [chunk_elements * itemsize] * len(folders)
        slot_bytes += [chunk_elements * state_itemsize] * states
        arithmetic = ChunkArithmetic(
            strategy=strategy,
            weights=weights,
            labels=[folder.label for folder in folders],
            capacity=chunk_elements,
            scales=scales,
        )
        statistics = UpdateStatistics([0.0] * len(clients), [0.0] * len(clients))
        loader = ChunkLoader(tasks=tasks(), slot_bytes=slot_bytes, slots=SLOTS)
        compute = ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="aggregate-compute")
        pending: deque[tuple[LoadedChunk, Future[ChunkResult]]] = deque()

        def write_oldest() -> None:
            chunk, future = pending.popleft()
            try:
                result = future.result()
            except AggregationError as error:
                culprits = non_finite_clients(chunk, len(clients))
                if culprits:
                    raise NonFiniteClients(culprits) from error
                raise
            writes = [outputs.model[shard_of[result.tensor]].write(result.model_bytes)]
            for output, data in zip(outputs.state, result.state_bytes):
                writes.append(output.write(data))
            chunk.hashing += [hashing for hashing in writes if hashing is not None]
            statistics.add(result)
            loader.release(chunk)

        try:
            for chunk in loader:
                pending.append((chunk, compute.submit(arithmetic.apply, chunk)))
                if len(pending) >= COMPUTE_THREADS:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            compute.shutdown(wait=True, cancel_futures=True)
            loader.close()
        output_hashes = outputs.close()
        input_hashes, hash_sources = inputs.hashes(len(folders))
        return StreamOutcome(
            statistics=statistics,
            input_hashes=input_hashes,
            hash_sources=hash_sources,
            output_hashes=output_hashes,
            bytes_read=sum(file.bytes_read for file in inputs.files.values()),
            bytes_written=sum(output.size for output in outputs.files.values()),
        )
    except BaseException:
        if outputs is not None:
            outputs.abandon()
        raise
    finally:
        inputs.close()
