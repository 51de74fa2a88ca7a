"""Reading a facility's files: one bounded reading, and every failure a refusal.

A facility is untrusted: whatever it sends is read by the bounded readers (``bounded_json``,
``safetensors_format``, ``metrics``), and whatever goes wrong while its bytes are parsed is an
``AggregationError`` naming the client and the file, never another exception (a RecursionError,
a ValueError of a huge integer, a TypeError of a value of the wrong kind): the pull sets the
facility aside instead of retrying, and the aggregation leaves the client out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xffl_tasks.adapter import ADAPTER_CONFIG, MAX_CONFIG_BYTES, AdapterError
from xffl_tasks.aggregate.bounded_json import JSONError, load_json
from xffl_tasks.aggregate.errors import AggregationError

#: PEFT's adapter_config.json nests maps of lists at most (``loftq_config``, ``rank_pattern``).
MAX_CONFIG_DEPTH = 4
#: What parsing hostile bytes may raise besides our own errors. Not OSError (a read that
#: failed is worth retrying) nor MemoryError (the readers bound every size first).
PARSE_FAILURES = (
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    RecursionError,
    struct.error,
)


@contextmanager
def refusing(label: str, file: str | None = None) -> Iterator[None]:
    """Turns any parse failure inside into an AggregationError naming ``label`` (the client)
    and ``file``; our own typed errors (AggregationError, AdapterError, which name what is
    wrong already) pass as they are."""
    try:
        yield
    except (AggregationError, AdapterError):
        raise
    except PARSE_FAILURES as error:
        where = f"{label}: {file}" if file else label
        detail = str(error)[:300] or type(error).__name__
        raise AggregationError(f"{where}: unreadable ({type(error).__name__}: {detail})") from None


def check_adapter_config_json(folder: Path, label: str) -> dict:
    """The folder's adapter_config.json read by the bounded reader (size, depth, UTF-8, no
    surrogates or duplicate keys): what ``xffl_tasks.adapter.read_adapter_config`` (and PEFT)
    parse after it is then plain JSON. Raises AggregationError naming the client and file."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise AggregationError(f"{label}: no {ADAPTER_CONFIG} in {folder}")
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    try:
        value = load_json(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
    except JSONError as error:
        raise AggregationError(f"{label}: {ADAPTER_CONFIG} {error}") from None
    if not isinstance(value, dict):
        raise AggregationError(f"{label}: {ADAPTER_CONFIG} is not a JSON object")
    return value
