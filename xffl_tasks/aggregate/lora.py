"""Aggregating LoRA adapter folders: ``lora-fedavg``, ``lora-svd``, ``lora-frozen-a``
(``lora-stacked``: ``xffl_tasks.aggregate.lora_stacked``).

The same entry point and CLI as the full-model aggregation (``aggregate(..., strategy=
"lora-svd")``; ``python -m xffl_tasks.aggregate --strategy lora-svd``) dispatch here when
the strategy is an adapter strategy. The previous global adapter and the clients' adapters are
PEFT folders (``adapter_config.json``, ``adapter_model.safetensors``, ``metrics.json``). An
adapter is small (LLaMA-2-7B, r=16 on the four attention projections: 16.8 M parameters, 67 MB
in float32), so each is read whole rather than streamed.

The checks are those of full models, by name: every header parsed and validated before any
tensor byte is read; a client whose metrics, adapter config (r, alpha, target modules),
tensor names, shapes or dtypes differ from the previous adapter's, or whose tensors hold NaN
or Inf (named with the element's index), is left out with its reason, as long as
``min_clients`` remain. ``lora-frozen-a`` also leaves out a client whose A differs from the
round's. The output (and momentum state, and statistics) must be finite: clients whose finite
values overflow it are left out, the largest update first, and the rest aggregated again;
``max_samples`` and ``norm_bound`` bound each client's claim and update (``lora_bounds``). The output is written into a staging folder beside ``out`` and renamed into place
only complete; ``aggregation.json`` has the full-model report's fields plus ``adapter`` (r,
alpha, scaling, modules) and, for lora-svd, ``layers``: per adapted module the relative
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
from xffl_tasks.aggregate.client_check import client_weight
from xffl_tasks.aggregate.client_order import by_name
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.facility_files import check_adapter_config_json, refusing
from xffl_tasks.aggregate.files import copy_file, sha256_file
from xffl_tasks.aggregate.finite_output import first_non_finite
from xffl_tasks.aggregate.inputs import check_client_inputs
from xffl_tasks.aggregate.lora_bounds import adapter_norm, all_finite, bound_adapters, culprits
from xffl_tasks.aggregate.lora_options import check_adapter_options, check_adapter_strategy
from xffl_tasks.aggregate.metrics import METRICS_FILE
from xffl_tasks.aggregate.model_folder import refuse_pickles
from xffl_tasks.aggregate.report import REPORT_FILE, REPORT_FORMAT, client_entry
from xffl_tasks.aggregate.safetensors_format import (
    HeaderError,
    SafetensorsHeader,
    load_tensors,
    read_header,
)
from xffl_tasks.aggregate.staging import staged_folder
from xffl_tasks.aggregate.update_bounds import NormBound, check_max_samples
from xffl_tasks.aggregate.weights import ClientWeight, check_given_weights, normalize

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
        with refusing(label, ADAPTER_CONFIG):  # the bounded reading first (facility_files)
            check_adapter_config_json(path, label)
            settings = read_adapter_config(path, label=label)
        with refusing(label, ADAPTER_WEIGHTS):
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
    """Reads the tensors (after the header checks), hashing every top-level file. The bytes
    are read as the checked header says (``load_tensors``), not by the safetensors library."""
    raw = (path / ADAPTER_WEIGHTS).read_bytes()
    files = {ADAPTER_WEIGHTS: hashlib.sha256(raw).hexdigest()}
    with refusing(label, ADAPTER_WEIGHTS):
        tensors = load_tensors(raw, header)  # widened to float64 in the arithmetic
    size = len(raw)
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.name != ADAPTER_WEIGHTS:
            files[entry.name], n = sha256_file(entry)
            size += n
    for name, tensor in tensors.items():
        found = first_non_finite(tensor)
        if found is not None:
            raise AggregationError(f"{label}: tensor {name!r} holds {found[0]} at {found[1]}")
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


def check_frozen_a(prior: Adapter, adapter: Adapter, label: str) -> None:
    """lora-frozen-a: every lora_A of the client equals the round's."""
    for module, (a_key, _) in lora_pairs(prior.tensors).items():
        if not torch.equal(adapter.tensors[a_key].double(), prior.tensors[a_key].double()):
            raise AggregationError(
                f"{label}: lora_A of {module} differs from the round's A (lora-frozen-a trains B only)"
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


def _combine(strategy, pairs, prior, accepted, normalized, eta, momentum, state, settings):
    """The new adapter tensors (float64) and, for lora-svd, each layer's residual; updates
    the momentum ``state`` (a dict) in place."""
    new: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for module, (a_key, b_key) in pairs.items():
        a_list = [adapter.tensors[a_key] for _, adapter, _ in accepted]
        b_list = [adapter.tensors[b_key] for _, adapter, _ in accepted]
        if strategy == "lora-svd":
            coefficients = [eta * w for w in normalized]
            a_in, b_in = list(a_list), list(b_list)
            if eta != 1.0:
                a_in.append(prior.tensors[a_key])
                b_in.append(prior.tensors[b_key])
                coefficients.append(1.0 - eta)
            factored = lora_math.svd_factors(a_in, b_in, coefficients, settings.r)
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
    return new, layers


def _statistics(pairs, prior, accepted, output, settings):
    """Each client's squared update norm, its dot with the change, the change's squared norm."""
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
    return squared, dots, change_squared


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
    max_samples: Sequence[int | None] | None = None,
    norm_bound: NormBound | None = None,
) -> dict:
    """Aggregates the clients' adapters into the next global adapter at ``out`` (see the
    module docstring); returns what it wrote to ``out/aggregation.json``. ``max_samples``
    and ``norm_bound``: as ``aggregation.aggregate`` (the norm in the space of the adapter
    tensors: ``lora_bounds``)."""
    started = time.perf_counter()
    previous, out = Path(previous), Path(out)
    if check_adapter_strategy(strategy) == "lora-stacked":
        raise AggregationError(
            "lora-stacked stacks the factors instead: xffl_tasks.aggregate.lora_stacked.aggregate_stacked"
        )
    paths, names, min_clients = check_client_inputs(
        previous, clients, out, names=names, min_clients=min_clients,
        max_weight_share=max_weight_share,
    )  # fmt: skip
    resolved = check_adapter_options(strategy, dict(options or {}))
    given = check_given_weights(names, weights) if weights is not None else None
    bounds = check_max_samples(max_samples, len(names))
    names, paths, per_client = by_name(  # sums in a fixed order (client_order)
        names, paths, list(zip(given or [None] * len(names), bounds))
    )
    label = "previous adapter"
    settings, header = _open_adapter(previous, label)
    prior = _load(previous, label, settings, header)
    pairs = lora_pairs(prior.tensors)
    rejected: dict[str, str] = {}
    accepted: list[tuple[str, Adapter, ClientWeight]] = []
    for index, (name, path) in enumerate(zip(names, paths)):
        label = f"client {name!r}"
        try:
            weight = client_weight(path, name, *per_client[index])
            their_settings, their_header = _open_adapter(path, label)
            _same_tensors(prior, label, their_settings, their_header)
            adapter = _load(path, label, their_settings, their_header)
            if strategy == "lora-frozen-a":
                check_frozen_a(prior, adapter, label)
        except AggregationError as error:
            logger.info("client %r fails its checks: %s", name, error)
            rejected[name] = str(error)
            continue
        accepted.append((name, adapter, weight))
    bounded = None
    if norm_bound is not None and accepted:  # the norms of the adapters' tensors: lora_bounds
        accepted, bounded = bound_adapters(prior.tensors, accepted, norm_bound)
        rejected.update(bounded.refused)
    eta = resolved["server_learning_rate"]
    momentum = resolved.get("momentum", 0.0)
    state, rounds = (
        _read_momentum(previous, strategy, list(prior.tensors)) if momentum > 0 else ({}, 0)
    )
    dtypes = {e.name: e.dtype.torch for e in header.tensors}

    def attempt(clients: list) -> tuple:
        """One aggregation of ``clients``, and the first output that is not finite (if any)."""
        shares = normalize([w.weight for _, _, w in clients], max_weight_share)
        moved = dict(state)
        new, layers = _combine(
            strategy, pairs, prior, clients, shares, eta, momentum, moved, settings
        )
        output = {key: tensor.to(dtypes[key]).contiguous() for key, tensor in new.items()}
        statistics = _statistics(pairs, prior, clients, output, settings)
        written = [*output.items(), *((f"momentum {k}", t.float()) for k, t in moved.items())]
        bad = next((key for key, t in written if not all_finite([t], [])), None)
        if bad is None and not all_finite([], [*statistics[0], *statistics[1], statistics[2]]):
            bad = "the update statistics"
        return shares, layers, moved, output, statistics, bad

    while True:
        if len(accepted) < min_clients:
            raise AggregationError(
                f"only {len(accepted)} of {len(names)} clients passed the checks, min_clients is {min_clients}; "
                + "; ".join(rejected.values())
            )
        normalized, layers, moved, output, (squared, dots, change_squared), bad = attempt(accepted)
        if bad is None:
            break

        def finite_without(out: frozenset[int]) -> bool:
            try:
                return attempt([c for i, c in enumerate(accepted) if i not in out])[-1] is None
            except AggregationError:  # e.g. a weight cap no longer feasible
                return False

        magnitudes = [adapter_norm(prior.tensors, a.tensors) for _, a, _ in accepted]
        found = culprits(magnitudes, finite_without, f"{strategy} ({bad!r})")
        for index, reason in found.items():
            logger.info("client %r fails its checks: %s", accepted[index][0], reason)
            rejected[accepted[index][0]] = f"client {accepted[index][0]!r}: {reason}"
        accepted = [c for i, c in enumerate(accepted) if i not in found]
    state = moved
    global_norm = math.sqrt(change_squared)
    clients_report = [
        client_entry(client, share, squared[index], dots[index], global_norm)
        for index, (client, share) in enumerate(zip(accepted, normalized))
    ]
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
            "exact": strategy == "lora-frozen-a",  # lora-svd: the best rank-r approximation
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
            "max_samples": dict(zip(names, bounds)) if max_samples is not None else None,
            "norm_bound": bounded.report() if bounded is not None else None,
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

