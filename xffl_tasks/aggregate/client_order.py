"""The order in which clients are aggregated: by name, whatever order they arrive in.

Floating-point sums depend on their order (``(a + b) + c`` may differ from ``(c + b) + a`` in
the last bit), and the weighted sum of the clients' updates is one. So that the same clients
give the same bytes however a caller lists them (the order the pulls finished in, the order
of a configuration file, of a directory listing), every aggregation sorts its clients by name
first, by Unicode code point (no locale), and the report lists them in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def name_order(names: Sequence[str]) -> list[int]:
    """The positions of ``names`` taken in name order: ``["b", "c", "a"]`` -> ``[2, 0, 1]``.

    The names must be distinct (``weights.resolve_names`` checks it), so the order is total.
    """
    return sorted(range(len(names)), key=lambda index: names[index])


def by_name(
    names: Sequence[str], paths: Sequence[Path], weights: Sequence[T] | None = None
) -> tuple[list[str], list[Path], list[T] | None]:
    """Names, folders and (if given) weights of the clients, all sorted by name together."""
    order = name_order(names)
    return (
        [names[i] for i in order],
        [paths[i] for i in order],
        None if weights is None else [weights[i] for i in order],
    )
