"""Aggregating LoRA adapter folders: ``lora-fedavg``, ``lora-exact``, ``lora-frozen-a``.

The same entry point and CLI as the full-model aggregation (``aggregate(..., strategy=
"lora-exact")``; ``python -m xffl_tasks.aggregate --strategy lora-exact``) dispatch here when
the strategy is an adapter strategy. The previous global adapter and the clients' adapters are
PEFT folders (``adapter_config.json``, ``adapter_model.safetensors``, ``metrics.json``). An
adapter is small (LLaMA-2-7B, r=16 on the four attention projections: 16.8 M parameters, 67 MB
in float32), so each is read whole rather than streamed.

The checks are those of full models, by name: every header parsed and validated before any
tensor byte is read; a client whose metrics, adapter config (r, alpha, target modules),
tensor names, shapes or dtypes differ from the previous adapter's, or whose tensors hold NaN
or Inf (named with the element's index), is left out with its reason, as long as
``min_clients`` remain. ``lora-frozen-a`` also leaves out a client whose A differs from the
round's. The output is written into a staging folder beside ``out`` and renamed into place
only complete; ``aggregation.json`` has the full-model report's fields plus ``adapter`` (r,
alpha, scaling, modules) and, for lora-exact, ``layers``: per adapted module the relative
Frobenius norm of what rank r could not hold.

Server optimiser: ``server_learning_rate`` for every strategy; ``momentum`` (FedAvgM on the A
and B tensors, state in ``server_state/momentum.safetensors``) for lora-fedavg and
lora-frozen-a. Adam-type server optimisers are not offered for adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xffl_tasks.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraSettings,
    lora_pairs,
    read_adapter_config,
)
from xffl_tasks.aggregate import lora_math
from xffl_tasks.aggregate.client_order import by_name
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.files import copy_file, sha256_file
from xffl_tasks.aggregate.inputs import check_client_inputs
from xffl_tasks.aggregate.lora_options import check_adapter_options
from xffl_tasks.aggregate.metrics import METRICS_FILE
from xffl_tasks.aggregate.model_folder import refuse_pickles
from xffl_tasks.aggregate.report import REPORT_FILE, REPORT_FORMAT, cosine
from xffl_tasks.aggregate.safetensors_format import HeaderError, SafetensorsHeader, read_header
from xffl_tasks.aggregate.staging import staged_folder
from xffl_tasks.aggregate.weights import (
    ClientWeight,
    check_given_weights,
    normalize,
    weight_from_metrics,
)

logger = logging.getLogger(__name__)

STATE_DIR = "server_state"
MOMENTUM_FILE = "momentum.safetensors"
STATE_FORMAT = "xffl-server-state/1"
#: What a previous adapter folder holds that is not carried into the next one.
NOT_CARRIED = frozenset({REPORT_FILE, METRICS_FILE, ADAPTER_WEIGHTS})


@dataclass
class Adapter:
    """One adapter folder, read and checked: its settings, header and tensors."""

    label: str
    path: Path
    settings: LoraSettings
    header: SafetensorsHeader
    tensors: dict[str, torch.Tensor]
    files: dict[str, str]
    bytes_read: int


def _open_adapter(path: Path, label: str) -> tuple[LoraSettings, SafetensorsHeader]:
    refuse_pickles(path, label)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AggregationError(f"{label}: no {ADAPTER_WEIGHTS} in {path}")
    try:
        settings = read_adapter_config(path, label=label)
        header = read_header(weights)
        lora_pairs(entry.name for entry in header.tensors)
    except (AdapterError, HeaderError) as error:
        raise AggregationError(
            f"{label}: {ADAPTER_WEIGHTS}: {error}" if isinstance(error, HeaderError) else str(error)
        ) from None
    for entry in header.tensors:
        if not entry.dtype.floating:
            raise AggregationError(
                f"{label}: tensor {entry.name!r} has dtype {entry.dtype.name}, not a float"
            )
    return settings, header


def _load(path: Path, label: str, settings: LoraSettings, header: SafetensorsHeader) -> Adapter:
    """Reads the tensors (after the header checks), hashing every top-level file."""
    from safetensors.torch import load

    raw = (path / ADAPTER_WEIGHTS).read_bytes()
    files = {ADAPTER_WEIGHTS: hashlib.sha256(raw).hexdigest()}
    tensors = load(raw)  # widened to float64 one layer at a time, in the arithmetic
    size = len(raw)
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.name != ADAPTER_WEIGHTS:
            files[entry.name], n = sha256_file(entry)
            size += n
    for name, tensor in tensors.items():
        if bool(torch.isfinite(tensor).all()):
            continue
        bad = (~torch.isfinite(tensor)).nonzero()
        if len(bad):
            index = [int(i) for i in bad[0]]
            kind = "NaN" if math.isnan(float(tensor[tuple(index)])) else "Inf"
            raise AggregationError(f"{label}: tensor {name!r} holds {kind} at {index}")
    return Adapter(label, path, settings, header, tensors, files, size)


def _same_tensors(
    previous: Adapter, label: str, settings: LoraSettings, header: SafetensorsHeader
) -> None:
    if settings != previous.settings:
        raise AggregationError(
            f"{label}: {ADAPTER_CONFIG} (r={settings.r}, alpha={settings.alpha:g}, modules "
            f"{list(settings.target_modules)}) differs from the previous adapter's (r={previous.settings.r}, "
            f"alpha={previous.settings.alpha:g}, modules {list(previous.settings.target_modules)})"
        )
    mine = {e.name: e for e in previous.header.tensors}
    theirs = {e.name: e for e in header.tensors}
    extra, missing = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    if extra:
        raise AggregationError(f"{label}: tensor {extra[0]!r} is not in the previous adapter")
    if missing:
        raise AggregationError(f"{label}: lacks tensor {missing[0]!r} of the previous adapter")
    for name, entry in mine.items():
        if theirs[name].shape != entry.shape:
            raise AggregationError(
                f"{label}: tensor {name!r} has shape {list(theirs[name].shape)}, the previous adapter {list(entry.shape)}"
            )
        if theirs[name].dtype != entry.dtype:
            raise AggregationError(
                f"{label}: tensor {name!r} has dtype {theirs[name].dtype.name}, the previous adapter {entry.dtype.name}"
            )


def _read_momentum(
    previous: Path, strategy: str, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], int]:
    path = previous / STATE_DIR / MOMENTUM_FILE
    if not path.is_file():
        return {}, 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != STATE_FORMAT or metadata.get("strategy") != strategy:
            raise AggregationError(
                f"previous adapter: {STATE_DIR}/{MOMENTUM_FILE} was written by {metadata.get('strategy')!r}, "
                f"not {strategy} (keep the campaign's strategy)"
            )
        if sorted(file.keys()) != sorted(names):
            raise AggregationError(
                f"previous adapter: {STATE_DIR}/{MOMENTUM_FILE} does not hold the adapter's tensors"
            )
        state = {name: file.get_tensor(name).double() for name in file.keys()}
    return state, int(metadata.get("rounds", "0"))


def aggregate_adapters(
    previous: Path,
    clients: Sequence[Path],
    out: Path,
    *,
    strategy: str,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    options: Mapping[str, float] | None = None,
    min_clients: int | None = None,
    max_weight_share: float | None = None,
) -> dict:
    """Aggregates the clients' adapters into the next global adapter at ``out`` (see the
    module docstring); returns what it wrote to ``out/aggregation.json``."""
    started = time.perf_counter()
    previous, out = Path(previous), Path(out)
    paths, names, min_clients = check_client_inputs(
        previous, clients, out, names=names, min_clients=min_clients,
        max_weight_share=max_weight_share,
    )  # fmt: skip
    resolved = check_adapter_options(strategy, dict(options or {}))
    given = check_given_weights(names, weights) if weights is not None else None
    names, paths, given = by_name(names, paths, given)  # sums in a fixed order (client_order)
    label = "previous adapter"
    settings, header = _open_adapter(previous, label)
    prior = _load(previous, label, settings, header)
    pairs = lora_pairs(prior.tensors)
    rejected: dict[str, str] = {}
    accepted: list[tuple[str, Adapter, ClientWeight]] = []
    for index, (name, path) in enumerate(zip(names, paths)):
        label = f"client {name!r}"
        try:
            weight = given[index] if given is not None else weight_from_metrics(path, name)
            their_settings, their_header = _open_adapter(path, label)
            _same_tensors(prior, label, their_settings, their_header)
            adapter = _load(path, label, their_settings, their_header)
            if strategy == "lora-frozen-a":
                for module, (a_key, _) in pairs.items():
                    if not torch.equal(
                        adapter.tensors[a_key].double(), prior.tensors[a_key].double()
                    ):
                        raise AggregationError(
                            f"{label}: lora_A of {module} differs from the round's A (lora-frozen-a trains B only)"
                        )
        except AggregationError as error:
            logger.info("client %r fails its checks: %s", name, error)
            rejected[name] = str(error)
            continue
        accepted.append((name, adapter, weight))
    if len(accepted) < min_clients:
        raise AggregationError(
            f"only {len(accepted)} of {len(names)} clients passed the checks, min_clients is {min_clients}; "
            + "; ".join(rejected.values())
        )
    normalized = normalize([w.weight for _, _, w in accepted], max_weight_share)
    eta = resolved["server_learning_rate"]
    momentum = resolved.get("momentum", 0.0)
    state, rounds = (
        _read_momentum(previous, strategy, list(prior.tensors)) if momentum > 0 else ({}, 0)
    )
    new: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for module, (a_key, b_key) in pairs.items():
        a_list = [adapter.tensors[a_key] for _, adapter, _ in accepted]
        b_list = [adapter.tensors[b_key] for _, adapter, _ in accepted]
        if strategy == "lora-exact":
            coefficients = [eta * w for w in normalized]
            a_in, b_in = list(a_list), list(b_list)
            if eta != 1.0:
                a_in.append(prior.tensors[a_key])
                b_in.append(prior.tensors[b_key])
                coefficients.append(1.0 - eta)
            factored = lora_math.exact_factors(a_in, b_in, coefficients, settings.r)
            new[a_key], new[b_key] = factored.a, factored.b
            layers[module] = {"residual": factored.residual, "svd": factored.method}
            continue
        if strategy == "lora-frozen-a":
            mean_a, mean_b = lora_math.frozen_a_factors(prior.tensors[a_key], b_list, normalized)
        else:
            mean_a, mean_b = lora_math.average_factors(a_list, b_list, normalized)
        for key, mean in ((a_key, mean_a), (b_key, mean_b)):
            change = mean - prior.tensors[key].double()
            if momentum > 0:
                state[key] = momentum * state.get(key, torch.zeros_like(change)) + change
                change = state[key]
            new[key] = prior.tensors[key].double() + eta * change
    dtypes = {e.name: e.dtype.torch for e in header.tensors}
    output = {key: tensor.to(dtypes[key]).contiguous() for key, tensor in new.items()}
    # the statistics in the space of the merged weights (scaling * B A): what the base
    # model's layers change by, the same for every strategy (A and B alone are not unique)
    scale2 = settings.scaling**2
    squared = [0.0] * len(accepted)
    dots = [0.0] * len(accepted)
    change_squared = 0.0
    for a_key, b_key in pairs.values():
        s, d, c = lora_math.update_statistics(
            (prior.tensors[a_key], prior.tensors[b_key]),
            [(adapter.tensors[a_key], adapter.tensors[b_key]) for _, adapter, _ in accepted],
            (output[a_key].double(), output[b_key].double()),
        )
        squared = [x + y * scale2 for x, y in zip(squared, s)]
        dots = [x + y * scale2 for x, y in zip(dots, d)]
        change_squared += c * scale2
    global_norm = math.sqrt(change_squared)
    clients_report = []
    for index, ((name, adapter, weight), share) in enumerate(zip(accepted, normalized)):
        norm = math.sqrt(squared[index])
        entry = {
            "name": name,
            "path": str(adapter.path),
            "weight": weight.weight,
            "weight_source": weight.source,
            "normalized_weight": share,
            "files": dict(sorted(adapter.files.items())),
            "update_norm": norm,
            "cosine_to_aggregate": cosine(dots[index], norm, global_norm),
        }
        if weight.num_samples is not None:
            entry["num_samples"] = weight.num_samples
        if weight.num_tokens is not None:
            entry["num_tokens"] = weight.num_tokens
        clients_report.append(entry)
    with staged_folder(out) as stage:
        from safetensors.torch import save_file

        save_file(output, str(stage / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        output_files: dict[str, str] = {}
        output_files[ADAPTER_WEIGHTS], written = sha256_file(stage / ADAPTER_WEIGHTS)
        for path in sorted(previous.iterdir()):
            if path.is_file() and path.name not in NOT_CARRIED:
                output_files[path.name], size = copy_file(path, stage / path.name)
                written += size
        if momentum > 0:
            (stage / STATE_DIR).mkdir()
            metadata = {
                "format": STATE_FORMAT,
                "strategy": strategy,
                "state": "momentum",
                "rounds": str(rounds + 1),
            }
            state_out = {k: v.float().contiguous() for k, v in state.items()}
            save_file(state_out, str(stage / STATE_DIR / MOMENTUM_FILE), metadata=metadata)
            output_files[f"{STATE_DIR}/{MOMENTUM_FILE}"], size = sha256_file(
                stage / STATE_DIR / MOMENTUM_FILE
            )
            written += size
        residuals = [layer["residual"] for layer in layers.values()]
        report = {
            "format": REPORT_FORMAT,
            "strategy": strategy,
            "options": resolved,
            "weighted": True,
            "exact": strategy != "lora-fedavg",
            "previous": str(previous),
            "output": str(out),
            "clients": clients_report,
            "previous_files": dict(sorted(prior.files.items())),
            "output_files": dict(sorted(output_files.items())),
            "server_state_rounds": rounds + 1 if momentum > 0 else None,
            "tensors_aggregated": len(output),
            "elements_aggregated": sum(t.numel() for t in output.values()),
            "global_update_norm": global_norm,
            "bytes_read": prior.bytes_read + sum(adapter.bytes_read for _, adapter, _ in accepted),
            "bytes_written": written,
            "adapter": {
                "r": settings.r,
                "alpha": settings.alpha,
                "scaling": settings.scaling,
                "target_modules": list(settings.target_modules),
                "layers": len(pairs),
            },
            "layers": layers or None,
            "max_residual": max(residuals) if residuals else None,
            "rejected": dict(rejected),
            "min_clients": min_clients,
            "max_weight_share": max_weight_share,
        }
        report["seconds"] = round(time.perf_counter() - started, 3)
        with open(stage / REPORT_FILE, "x", encoding="utf-8") as file:
            file.write(json.dumps(report, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
    for name, reason in rejected.items():
        logger.warning("client %r was left out of the aggregation: %s", name, reason)
    logger.info(
        "aggregated %d adapters with %s into %s in %.2f s (global update norm %.6g)",
        len(accepted), strategy, out, report["seconds"], global_norm,
    )  # fmt: skip
    return report


def check_client_adapter(previous: Path, client: Path, *, label: str) -> None:
    """The pull's check of a facility's adapter against the round's input adapter: config,
    headers, tensor names, shapes and dtypes (no tensor data read); raises AggregationError."""
    settings, header = _open_adapter(Path(previous), "the round's input adapter")
    prior = Adapter("the round's input adapter", Path(previous), settings, header, {}, {}, 0)
    their_settings, their_header = _open_adapter(Path(client), label)
    _same_tensors(prior, label, their_settings, their_header)
