"""What every aggregation (full models and LoRA adapters alike) checks of its inputs before it
reads a byte: clients given and named apart, ``min_clients`` and ``max_weight_share`` in range,
and an output that does not exist yet and lies apart from every input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.staging import check_absent, check_output_location
from xffl_tasks.aggregate.weights import check_share, resolve_names


def check_min_clients(min_clients: int | None, count: int) -> int:
    """``min_clients`` (all ``count`` clients when None), a whole number from 1 to ``count``."""
    if min_clients is None:
        return count
    if isinstance(min_clients, bool) or not isinstance(min_clients, int):
        raise AggregationError(f"min_clients {min_clients!r} is not a whole number")
    if not 1 <= min_clients <= count:
        raise AggregationError(f"min_clients {min_clients} must be from 1 to {count} (the clients)")
    return min_clients


def check_client_inputs(
    previous: Path,
    clients: Sequence[str | Path],
    out: Path,
    *,
    names: Sequence[str] | None,
    min_clients: int | None,
    max_weight_share: float | None,
) -> tuple[list[Path], list[str], int]:
    """The client folders, their names and ``min_clients`` resolved; raises naming what is wrong."""
    paths = [Path(client) for client in clients]
    if not paths:
        raise AggregationError("no client folders: give at least one")
    resolved = resolve_names(paths, names)
    needed = check_min_clients(min_clients, len(paths))
    check_share(max_weight_share)
    check_absent(out)
    check_output_location(out, [previous, *paths])
    return paths, resolved, needed
