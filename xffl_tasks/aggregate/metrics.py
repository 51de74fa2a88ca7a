"""A facility's ``metrics.json``: untrusted input, read bounded and checked against a schema.

Limits: at most ``MAX_METRICS_BYTES`` bytes (no more are read), at most ``MAX_DEPTH`` levels
of nesting (checked before parsing), and the schema of ``FIELDS``: ``num_samples`` is a whole
number from 1 to ``MAX_NUM_SAMPLES``; counts are whole numbers from 0 to ``MAX_COUNT``;
losses, times and rates are finite numbers (or null); names are strings of at most
``MAX_STRING`` characters; ``data``, ``hyperparameters`` and ``versions`` are flat maps of at
most ``MAX_MAP_ENTRIES`` such scalars or lists of strings. Unknown fields are dropped. The result is small and
JSON-safe: only it travels on (XCom, the round's manifest, the aggregation's report).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from xffl_tasks.aggregate.bounded_json import exceeds_depth
from xffl_tasks.aggregate.errors import AggregationError

METRICS_FILE = "metrics.json"
MAX_METRICS_BYTES = 64 << 10
MAX_DEPTH = 4
MAX_NUM_SAMPLES = 10**12
MAX_COUNT = 10**18
MAX_STRING = 1024
MAX_MAP_ENTRIES = 128

# field -> kind; num_samples is required.
FIELDS = {
    "num_samples": "samples",
    **dict.fromkeys(
        ("num_tokens", "val_tokens", "val_sequences", "train_sequences", "steps", "world_size",
         "threads", "seq_len"),
        "count",
    ),
    "seed": "integer",
    **dict.fromkeys(
        ("val_loss_before", "val_loss_after", "train_loss", "train_loss_last", "epochs", "seconds",
         "cpu_seconds", "step_seconds_median", "tokens_per_second", "learning_rate_last",
         "total_seconds"),
        "number",
    ),
    **dict.fromkeys(
        ("launcher", "device", "precision", "parallelism", "model", "started_at",
         "finished_at"),
        "string",
    ),
    "data": "map",
    "hyperparameters": "map",
    "versions": "map",
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
        if _whole(value) and abs(value) > MAX_COUNT or not math.isfinite(float(value)):
            raise refuse("is not a finite number")
        return float(value)
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
    if len(data) > MAX_METRICS_BYTES:
        raise MetricsError(client, None, f"is larger than {MAX_METRICS_BYTES} bytes")
    if exceeds_depth(data, MAX_DEPTH):
        raise MetricsError(client, None, f"nests deeper than {MAX_DEPTH} levels")
    try:
        metrics = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise MetricsError(client, None, f"is not UTF-8 ({error.reason})") from None
    except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
        raise MetricsError(client, None, f"is not valid JSON ({str(error)[:200]})") from None
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
