"""The server optimiser's state, kept as safetensors next to the global model.

A stateful strategy (fedavgm, fedadam, fedyogi) keeps, per floating tensor of the model, one
float32 tensor (float64 for F64 tensors) per state name, e.g. ``first_moment``. Each state name
is one file in the model folder's ``server_state/`` folder, with the model's tensor names, in
the order the model's tensors are processed (so it is read and written front to back):

    server_state/first_moment.safetensors
    server_state/second_moment.safetensors

Each file's ``__metadata__`` says ``format``, ``strategy``, ``state`` and ``rounds`` (how many
aggregations the state has seen). The aggregation reads them from the previous global model's
folder and writes the next ones into the output folder, so rounds chain. Hugging Face loaders
ignore the folder. A missing folder means the first round: the state starts at zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.model_folder import Shard, TensorLocation
from xffl_tasks.aggregate.safetensors_format import (
    DTYPES,
    DType,
    HeaderError,
    SafetensorsHeader,
    TensorEntry,
    build_header,
    read_header,
)
from xffl_tasks.aggregate.strategies import Strategy

STATE_FOLDER = "server_state"
STATE_FORMAT = "xffl-server-state/1"


def state_file(state_name: str) -> str:
    """The state file's path relative to the model folder."""
    return f"{STATE_FOLDER}/{state_name}.safetensors"


def state_dtype(tensor: TensorEntry) -> DType:
    """The dtype a state of ``tensor`` is kept in: its compute dtype (F32, or F64)."""
    return DTYPES["F64" if tensor.dtype.name == "F64" else "F32"]


def state_specs(tensors: Sequence[TensorEntry]) -> list[tuple[str, DType, tuple[int, ...]]]:
    """(name, dtype, shape) of the state tensors kept for ``tensors`` (the floating ones)."""
    return [(t.name, state_dtype(t), t.shape) for t in tensors]


def state_header(
    strategy: Strategy, state_name: str, tensors: Sequence[TensorEntry], rounds: int
) -> SafetensorsHeader:
    """The header of the state file written after ``rounds`` aggregations."""
    metadata = {
        "format": STATE_FORMAT,
        "strategy": strategy.name,
        "state": state_name,
        "rounds": str(rounds),
    }
    return build_header(state_specs(tensors), metadata)


@dataclass(frozen=True)
class ServerState:
    """The previous round's state files (one shard per state name), and how many rounds they saw."""

    files: tuple[Shard, ...]
    rounds: int
    by_name: tuple[Mapping[str, TensorLocation], ...]

    def locations(self, tensor: str) -> list[TensorLocation]:
        """Where each state of ``tensor`` lies, in ``state_names`` order."""
        return [locations[tensor] for locations in self.by_name]


def _check(
    shard: Shard, strategy: Strategy, state_name: str, tensors: Sequence[TensorEntry]
) -> int:
    where = f"previous global model: {shard.file}"
    metadata = dict(shard.header.metadata or {})
    if metadata.get("format") != STATE_FORMAT:
        raise AggregationError(
            f"{where}: format {metadata.get('format')!r} is not {STATE_FORMAT!r}"
        )
    if metadata.get("strategy") != strategy.name or metadata.get("state") != state_name:
        raise AggregationError(
            f"{where}: holds {metadata.get('strategy')!r} state {metadata.get('state')!r}, not {strategy.name}'s "
            f"{state_name!r}: keep the campaign's strategy, or start from a model folder without {STATE_FOLDER}/"
        )
    rounds = metadata.get("rounds", "")
    if not rounds.isdigit():
        raise AggregationError(f"{where}: metadata 'rounds' is {rounds!r}, not a count")
    expected = {name: (dtype, shape) for name, dtype, shape in state_specs(tensors)}
    found = {e.name: (e.dtype, e.shape) for e in shard.header.tensors}
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            raise AggregationError(f"{where}: lacks the state of tensor {name!r}")
        if name not in expected:
            raise AggregationError(
                f"{where}: holds state for tensor {name!r}, which the model does not have"
            )
        if found[name] != expected[name]:
            raise AggregationError(
                f"{where}: state of tensor {name!r} is {found[name][0].name} {list(found[name][1])}, "
                f"expected {expected[name][0].name} {list(expected[name][1])}"
            )
    return int(rounds)


def open_server_state(
    folder: Path, strategy: Strategy, tensors: Sequence[TensorEntry]
) -> ServerState | None:
    """The state in the previous global model's ``folder`` (None: start at zero).

    ``tensors`` are the model's floating tensors in processing order. A state folder that the
    strategy has no use for (fedavg after fedadam) is ignored.
    """
    if not strategy.state_names or not (folder / STATE_FOLDER).exists():
        return None
    shards, rounds = [], set()
    for state_name in strategy.state_names:
        relative = state_file(state_name)
        if not (folder / relative).is_file():
            raise AggregationError(f"previous global model: {relative} is missing from {folder}")
        try:
            header = read_header(folder / relative)
        except HeaderError as error:
            raise AggregationError(f"previous global model: {relative}: {error}") from None
        shard = Shard(relative, folder / relative, header)
        rounds.add(_check(shard, strategy, state_name, tensors))
        shards.append(shard)
    if len(rounds) != 1:
        raise AggregationError(
            f"previous global model: the files of {STATE_FOLDER}/ disagree on 'rounds'"
        )
    by_name = tuple(
        {e.name: TensorLocation(shard, e) for e in shard.header.tensors} for shard in shards
    )
    return ServerState(tuple(shards), rounds.pop(), by_name)
