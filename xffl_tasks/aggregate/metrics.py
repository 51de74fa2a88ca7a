"""A facility's ``metrics.json``: untrusted input, read bounded and checked against a schema.

Limits: at most ``MAX_METRICS_BYTES`` bytes (no more are read), at most ``MAX_DEPTH`` levels
of nesting (checked before parsing), integers of at most ``MAX_INT_DIGITS`` digits, strict
UTF-8 and no duplicate keys (``bounded_json.load_json``), and the schema of ``FIELDS``:
``num_samples`` is a whole number from 1 to ``MAX_NUM_SAMPLES``; counts are whole numbers from
0 to ``MAX_COUNT``; losses are finite numbers within +-``MAX_LOSS`` and the other numbers
(times, rates, epochs) finite numbers within their ``NUMBER_BOUNDS`` (or null); names are
strings of at most ``MAX_STRING`` characters; ``data``, ``hyperparameters``, ``versions`` and
``privacy`` are flat maps of at most ``MAX_MAP_ENTRIES`` scalars (numbers within
+-``MAX_COUNT``) or lists of strings. Unknown fields are dropped. The result is small and JSON-safe: only it travels on
(XCom, the round's manifest, the aggregation's report, the UI's plots).
"""

from __future__ import annotations

import math
from pathlib import Path

from xffl_tasks.aggregate.bounded_json import JSONError, load_json
from xffl_tasks.aggregate.errors import AggregationError

METRICS_FILE = "metrics.json"
MAX_METRICS_BYTES = 64 << 10
MAX_DEPTH = 4
MAX_NUM_SAMPLES = 10**12
MAX_COUNT = 10**18
MAX_STRING = 1024
MAX_MAP_ENTRIES = 128
#: Longer integers are refused unparsed; shorter ones reach the schema, which names the field.
MAX_INT_DIGITS = 1000
#: A loss beyond this is no loss a model reports (and the UI could not plot it).
MAX_LOSS = 1e6
LOSSES = ("val_loss_before", "val_loss_after", "train_loss", "train_loss_last")
#: The finite range of each number field (inclusive).
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(LOSSES, (-MAX_LOSS, MAX_LOSS)),
    "epochs": (0.0, 1e6),
    **dict.fromkeys(("seconds", "total_seconds", "step_seconds_median"), (0.0, 1e8)),
    "cpu_seconds": (0.0, 1e11),
    "tokens_per_second": (0.0, 1e12),
    "learning_rate_last": (0.0, 1e3),
}

# field -> kind; num_samples is required.
FIELDS = {
    "num_samples": "samples",
    **dict.fromkeys(
        ("num_tokens", "val_tokens", "val_sequences", "train_sequences", "steps", "world_size",
         "threads", "seq_len"),
        "count",
    ),
    "seed": "integer",
    **dict.fromkeys(NUMBER_BOUNDS, "number"),
    **dict.fromkeys(
        ("launcher", "device", "precision", "parallelism", "model", "started_at",
         "finished_at"),
        "string",
    ),
    "data": "map",
    "hyperparameters": "map",
    "versions": "map",
    # DP-SGD runs: the parameters the accountant needs (xffl_tasks.privacy.params_from_metrics)
    "privacy": "map",
}  # fmt: skip


class MetricsError(AggregationError):
    """A client's metrics.json breaks a limit or the schema; names the client and the field."""

    def __init__(self, client: str, field: str | None, problem: str):
        self.client, self.field = client, field
        where = f"{METRICS_FILE} {field}" if field else METRICS_FILE
        super().__init__(f"client {client!r}: {where} {problem}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _check(client: str, field: str, kind: str, value: object) -> object:
    def refuse(problem: str) -> MetricsError:
        return MetricsError(client, field, f"{_describe(value)} {problem}")

    if kind in ("samples", "count", "integer"):
        low, high = {"samples": (1, MAX_NUM_SAMPLES), "count": (0, MAX_COUNT)}.get(
            kind, (-MAX_COUNT, MAX_COUNT)
        )
        if not _whole(value) or not low <= value <= high:
            raise refuse(f"is not a whole number from {low} to {high}")
        return value
    if kind == "number":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse("is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise refuse("is not a finite number")
        low, high = NUMBER_BOUNDS.get(field, (-MAX_COUNT, MAX_COUNT))
        if not low <= number <= high:
            raise refuse(f"is not a number from {low:g} to {high:g}")
        return number
    if kind == "string":
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > MAX_STRING:
            raise refuse(f"is not a string of at most {MAX_STRING} characters")
        return value
    if not isinstance(value, dict) or len(value) > MAX_MAP_ENTRIES:
        raise refuse(f"is not a map of at most {MAX_MAP_ENTRIES} entries")
    checked = {}
    for key, item in value.items():
        if len(key) > MAX_STRING:
            raise MetricsError(client, field, f"key {_describe(key)} is longer than {MAX_STRING}")
        inner = f"{field}.{key}"
        if isinstance(item, str) or item is None:
            checked[key] = _check(client, inner, "string", item)
        elif isinstance(item, bool):
            checked[key] = item
        elif isinstance(item, (int, float)):
            checked[key] = _check(
                client, inner, "number" if isinstance(item, float) else "integer", item
            )
        elif (
            isinstance(item, list)
            and len(item) <= MAX_MAP_ENTRIES
            and all(isinstance(x, str) and len(x) <= MAX_STRING for x in item)
        ):
            checked[key] = list(item)
        else:
            raise MetricsError(
                client,
                inner,
                f"{_describe(item)} is not a string, number, boolean or list of strings",
            )
    return checked


def parse_metrics(data: bytes, client: str) -> dict:
    """The validated metrics in ``data`` (a metrics.json's bytes), known fields only."""
    try:
        metrics = load_json(
            data, max_bytes=MAX_METRICS_BYTES, max_depth=MAX_DEPTH, max_int_digits=MAX_INT_DIGITS
        )
    except JSONError as error:
        raise MetricsError(client, None, str(error)) from None
    if not isinstance(metrics, dict):
        raise MetricsError(client, None, "is not a JSON object")
    if "num_samples" not in metrics:
        raise MetricsError(client, "num_samples", "is missing (the default weight)")
    return {
        field: _check(client, field, FIELDS[field], value)
        for field, value in metrics.items()
        if field in FIELDS
    }


def read_metrics(folder: Path, client: str) -> dict:
    """The client's validated metrics.json (at most ``MAX_METRICS_BYTES + 1`` bytes are read)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise AggregationError(
            f"client {client!r}: no {METRICS_FILE} in {folder} (its num_samples is the default weight); "
            "give the weights explicitly (--weights) or add it"
        )
    with open(path, "rb") as file:
        data = file.read(MAX_METRICS_BYTES + 1)
    return parse_metrics(data, client)
