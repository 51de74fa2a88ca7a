"""``aggregation.json``: what the aggregation read, wrote and measured, for the audit trail.

Fields the federation DAG reads: ``strategy``, ``clients`` (each: ``name``, ``path``,
``weight``, ``normalized_weight``, ``files`` {relative name: sha256}, ``update_norm``,
``cosine_to_aggregate``), ``previous_files``, ``output_files``, ``global_update_norm``,
``bytes_read``, ``bytes_written``, ``seconds``. Norms are Euclidean over every element of every
floating tensor; a client's update is (client - previous), the aggregate update is the change
applied to the global model (before rounding to the tensor's dtype); a cosine is null when
either norm is zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from xffl_tasks.aggregate.arithmetic import UpdateStatistics
from xffl_tasks.aggregate.strategies import Strategy
from xffl_tasks.aggregate.weights import ClientWeight

REPORT_FILE = "aggregation.json"
REPORT_FORMAT = "xffl-aggregation/1"


def cosine(dot: float, norm_a: float, norm_b: float) -> float | None:
    """``dot / (norm_a * norm_b)`` clipped to [-1, 1]; None when a norm is zero."""
    if norm_a == 0.0 or norm_b == 0.0:
        return None
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def build_report(
    *,
    strategy: Strategy,
    previous: Path,
    out: Path,
    names: Sequence[str],
    client_paths: Sequence[Path],
    weights: Sequence[ClientWeight],
    normalized: Sequence[float],
    client_files: Sequence[Mapping[str, str]],
    previous_files: Mapping[str, str],
    output_files: Mapping[str, str],
    statistics: UpdateStatistics,
    server_state_rounds: int | None,
    bytes_read: int,
    bytes_written: int,
    seconds: float,
) -> dict:
    """The report as a JSON-ready dict (see the module's docstring for the fields)."""
    global_norm = math.sqrt(statistics.change_squared)
    clients = []
    for index, name in enumerate(names):
        norm = math.sqrt(statistics.squared_norms[index])
        entry = {
            "name": name,
            "path": str(client_paths[index]),
            "weight": weights[index].weight,
            "weight_source": weights[index].source,
            "normalized_weight": normalized[index],
            "files": dict(sorted(client_files[index].items())),
            "update_norm": norm,
            "cosine_to_aggregate": cosine(statistics.dots[index], norm, global_norm),
        }
        if weights[index].num_samples is not None:
            entry["num_samples"] = weights[index].num_samples
        if weights[index].num_tokens is not None:
            entry["num_tokens"] = weights[index].num_tokens
        clients.append(entry)
    return {
        "format": REPORT_FORMAT,
        "strategy": strategy.name,
        "options": dict(strategy.options),
        "weighted": strategy.weighted,
        "previous": str(previous),
        "output": str(out),
        "clients": clients,
        "previous_files": dict(sorted(previous_files.items())),
        "output_files": dict(sorted(output_files.items())),
        "server_state_rounds": server_state_rounds,
        "tensors_aggregated": len(statistics.tensors),
        "elements_aggregated": statistics.elements,
        "global_update_norm": global_norm,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "seconds": round(seconds, 3),
    }

def client_entry(client, share: float, squared: float, dot: float, global_norm: float,
                 extra: Mapping[str, object] | None = None) -> dict:
    """A client's line in the adapter aggregations' report: ``client`` is (name, adapter,
    weight); ``extra`` (the stacked aggregation's rank, alpha, coefficient) follows the weights."""
    name, adapter, weight = client
    norm = math.sqrt(squared)
    entry = {
        "name": name,
        "path": str(adapter.path),
        "weight": weight.weight,
        "weight_source": weight.source,
        "normalized_weight": share,
        **(extra or {}),
        "files": dict(sorted(adapter.files.items())),
        "update_norm": norm,
        "cosine_to_aggregate": cosine(dot, norm, global_norm),
    }
    if weight.num_samples is not None:
        entry["num_samples"] = weight.num_samples
    if weight.num_tokens is not None:
        entry["num_tokens"] = weight.num_tokens
    return entry
