"""``lora-stacked``: the facilities' adapters stacked into an exact update, merged into the base.

    aggregate(previous, clients, out, strategy="lora-stacked")
    python -m xffl_tasks.aggregate --strategy lora-stacked --previous BASE_OR_PREVIOUS_OUT --out OUT CLIENT ...

Every facility trained a fresh adapter (B from zero, A from the seed) of its own rank and alpha
on the round's base, so its update is ``s_i B_i A_i``; the round's update is exactly ``D = sum_i
c_i B_i A_i`` with ``c_i = eta * w_i * s_i`` (``lora_stacked_math``). ``previous`` is the round's
canonical base model folder, or the previous lora-stacked output (its ``base/``, checked
against its ``base_hashes.json`` while it is read). ``out`` receives, renamed into place whole:

- ``stacked_update/``: the update as stacked factors (``xffl_tasks.stacked_update``), the
  folder every facility gets; it records the hashes of the base it applies to and of the result;
- ``base/``: the canonical next base, ``xffl_tasks.stacked_merge.merge_into`` of the previous
  base and the update, the same function (and so the same bytes) as every facility's merge;
- ``base_hashes.json``: the canonical base's sha256 per file and per tensor;
- ``aggregation.json``: the report (``stacked_update`` and ``canonical_base`` among its fields).

Clients are checked as by the other adapter strategies (metrics, pickles, plain LoRA config,
headers, NaN or Inf), and against the base: every adapted module a 2-D weight of the base with
``B`` of ``[out, r]`` and ``A`` of ``[r, in]``. Finite adapters that make the factors, the norms
or a merged weight non-finite (the merge refuses it: ``NonFiniteMerge``) are left out, naming
the tensor, and the rest stacked again. Ranks, alphas and even target modules may differ
between facilities. Options: ``server_learning_rate`` (scales the stacked B); no momentum.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xffl_tasks.adapter import LoraSettings, lora_pairs
from xffl_tasks.aggregate.client_order import by_name
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.finite_output import first_non_finite, leave_out
from xffl_tasks.aggregate.inputs import check_client_inputs
from xffl_tasks.aggregate.lora import Adapter, _load, _open_adapter
from xffl_tasks.aggregate.lora_options import check_adapter_options
from xffl_tasks.aggregate.lora_stacked_math import (
    merge_culprits,
    non_finite_parts,
    stack_factors,
    stacked_statistics,
)
from xffl_tasks.aggregate.model_folder import ModelFolder, open_model_folder
from xffl_tasks.aggregate.report import REPORT_FILE, REPORT_FORMAT, client_entry
from xffl_tasks.aggregate.staging import staged_folder
from xffl_tasks.aggregate.update_bounds import check_max_samples
from xffl_tasks.aggregate.weights import check_given_weights, normalize
from xffl_tasks.base_hashes import (
    HASHES_FILE,
    BaseHashError,
    BaseHashes,
    compare_hashes,
    load_base_hashes,
    write_base_hashes,
)
from xffl_tasks.stacked_merge import NonFiniteMerge, merge_into
from xffl_tasks.stacked_update import (
    UPDATE_CONFIG,
    StackedClient,
    StackedModule,
    StackedUpdate,
    StackedUpdateError,
    write_stacked_update,
)

logger = logging.getLogger(__name__)

STRATEGY = "lora-stacked"
UPDATE_DIR = "stacked_update"
BASE_DIR = "base"


def is_stacked_output(folder: Path) -> bool:
    """Whether ``folder`` is a lora-stacked output (``stacked_update/`` and ``base/``)."""
    return (folder / UPDATE_DIR / UPDATE_CONFIG).is_file() and (folder / BASE_DIR).is_dir()


def resolve_base(previous: Path) -> tuple[Path, BaseHashes | None]:
    """The round's canonical base: ``previous`` itself, or the ``base/`` of a previous
    lora-stacked output (with the record of its hashes)."""
    if is_stacked_output(previous):
        try:
            return previous / BASE_DIR, load_base_hashes(previous / HASHES_FILE)
        except BaseHashError as error:
            raise AggregationError(f"previous lora-stacked output: {error}") from None
    return previous, None


def _fits(base: ModelFolder, settings: LoraSettings, adapter_tensors: Mapping, label: str) -> None:
    """Every module of the adapter adapts a 2-D floating weight of the base, at its rank."""
    for module, (a_key, b_key) in lora_pairs(adapter_tensors).items():
        location = base.tensors.get(f"{module}.weight")
        if location is None:
            raise AggregationError(f"{label}: adapts {module}.weight, which the base lacks")
        shape = tuple(location.entry.shape)
        a_shape, b_shape = tuple(adapter_tensors[a_key]), tuple(adapter_tensors[b_key])
        if len(shape) != 2 or not location.entry.dtype.floating:
            raise AggregationError(f"{label}: {module}.weight of the base is not a 2-D float matrix")
        if a_shape != (settings.r, shape[1]) or b_shape != (shape[0], settings.r):
            raise AggregationError(
                f"{label}: {module}: B {list(b_shape)} @ A {list(a_shape)} does not fit the base's "
                f"{list(shape)} at r={settings.r}"
            )


def check_stacked_client(
    base: Path, client: Path, *, label: str, settings: LoraSettings | None = None
) -> LoraSettings:
    """The pull's check of a facility's adapter under lora-stacked, from headers alone: plain
    LoRA, its tensors fit the base at its own rank, and (``settings``) the facility's
    configured r, alpha and target modules. ``base``: the round's base model folder, or the
    previous lora-stacked output. Returns its settings; raises AggregationError."""
    base = Path(base)
    folder = open_model_folder(base / BASE_DIR if is_stacked_output(base) else base, label="the round's base")
    their_settings, header = _open_adapter(Path(client), label)
    shapes = {entry.name: tuple(entry.shape) for entry in header.tensors}
    _fits(folder, their_settings, shapes, label)
    if settings is not None and (
        (their_settings.r, their_settings.alpha, their_settings.target_modules)
        != (settings.r, settings.alpha, settings.target_modules)
    ):
        raise AggregationError(
            f"{label}: adapter r={their_settings.r}, alpha={their_settings.alpha:g}, modules "
            f"{list(their_settings.target_modules)}; the facility is set to r={settings.r}, "
            f"alpha={settings.alpha:g}, modules {list(settings.target_modules)}"
        )
    return their_settings


def _accept(
    base: ModelFolder, names: Sequence[str], paths: Sequence[Path], given, rejected: dict[str, str],
    max_samples: Sequence[int | None],
) -> list[tuple[str, Adapter, object]]:
    from xffl_tasks.aggregate.client_check import client_weight

    accepted = []
    for index, (name, path) in enumerate(zip(names, paths)):
        label = f"client {name!r}"
        try:
            weight = client_weight(path, name, given[index] if given is not None else None, max_samples[index])
            settings, header = _open_adapter(path, label)
            _fits(base, settings, {e.name: tuple(e.shape) for e in header.tensors}, label)
            adapter = _load(path, label, settings, header)
        except AggregationError as error:
            logger.info("client %r fails its checks: %s", name, error)
            rejected[name] = str(error)
            continue
        accepted.append((name, adapter, weight))
    return accepted


@dataclass
class _Stack:
    """One stacking of the accepted clients (indices into them): the update and its norms."""

    normalized: list[float]
    clients: tuple[StackedClient, ...]
    modules: dict[str, StackedModule]
    tensors: dict[str, torch.Tensor]
    inputs: dict[str, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]]  # members, As, Bs
    squared: list[float]
    dots: list[float]
    change_squared: float


def _stack(base: ModelFolder, accepted: Sequence[tuple], eta: float, max_weight_share: float | None) -> _Stack:
    normalized = normalize([w.weight for _, _, w in accepted], max_weight_share)
    stack = tuple(
        StackedClient(name, a.settings.r, float(a.settings.alpha), share, eta * share * a.settings.scaling)
        for (name, a, _), share in zip(accepted, normalized)
    )
    pairs = [lora_pairs(adapter.tensors) for _, adapter, _ in accepted]
    built = _Stack(normalized, stack, {}, {}, {}, [0.0] * len(accepted), [0.0] * len(accepted), 0.0)
    for module in sorted({m for p in pairs for m in p}):
        members = [i for i, p in enumerate(pairs) if module in p]
        a_list = [accepted[i][1].tensors[pairs[i][module][0]] for i in members]
        b_list = [accepted[i][1].tensors[pairs[i][module][1]] for i in members]
        coefficients = [stack[i].coefficient for i in members]
        shape = tuple(base.tensors[f"{module}.weight"].entry.shape)
        entry = StackedModule(
            module, (shape[0], shape[1]), tuple(stack[i].name for i in members),
            sum(stack[i].r for i in members),
        )  # fmt: skip
        built.modules[module], built.inputs[module] = entry, (members, a_list, b_list)
        built.tensors[entry.a_key], built.tensors[entry.b_key] = stack_factors(a_list, b_list, coefficients)
        s, d, c = stacked_statistics(a_list, b_list, [stack[i].scaling for i in members], coefficients)
        for position, i in enumerate(members):
            built.squared[i] += s[position]
            built.dots[i] += d[position]
        built.change_squared += c
    return built


def _factor_culprits(built: _Stack) -> dict[int, str]:
    """The clients whose own part of a stacked factor is not finite (``c_i B_i`` or ``A_i``
    beyond float32): index -> reason."""
    found: dict[int, str] = {}
    for module, entry in built.modules.items():
        members = built.inputs[module][0]
        ranks = [built.clients[i].r for i in members]
        for position, factor in non_finite_parts(built.tensors[entry.a_key], built.tensors[entry.b_key], ranks).items():
            c = built.clients[members[position]].coefficient
            found.setdefault(members[position], f"its update makes {module}.{factor} non-finite (overflow: "
                             f"beyond float32, coefficient {c:.6g})")  # fmt: skip
    return found


def _statistics_culprits(base, accepted, built: _Stack, eta, max_weight_share) -> dict[int, str]:
    """The clients to leave out so that the update's norms are finite (``leave_out``)."""
    def finite(stack: _Stack) -> bool:
        return all(math.isfinite(x) for x in (*stack.squared, *stack.dots, stack.change_squared))

    def finite_without(out: frozenset[int]) -> bool:
        try:
            return finite(_stack(base, [c for i, c in enumerate(accepted) if i not in out], eta, max_weight_share))
        except AggregationError:  # e.g. a weight cap no longer feasible
            return False

    norms = [math.sqrt(x) if x >= 0 else math.nan for x in built.squared]
    found = [] if finite(built) else leave_out(norms, finite_without)
    if found is None:
        raise AggregationError(f"the {STRATEGY} update norms are not finite (server options out of range?)")
    return {i: f"its update makes the update norms non-finite (overflow; update norm {norms[i]:.6g})" for i in found}


def _merge_culprits(base, accepted, built: _Stack, error: NonFiniteMerge, eta, max_weight_share) -> dict[int, str]:
    """The clients that make the merged ``error.tensor`` non-finite (``merge_culprits``):
    index -> reason; an AggregationError naming the tensor when none can be blamed."""
    tensor, what = error.tensor, f"{error.kind} at {error.index}"
    weight = error.weight  # the previous canonical base's, as the merge read it
    bad = first_non_finite(weight)
    if bad is not None:
        raise AggregationError(f"{base.label}: {tensor!r} holds {bad[0]} at {bad[1]}: no merge into it is finite")
    members, a_list, b_list = built.inputs[tensor.removesuffix(".weight")]

    def coefficients_without(out: frozenset[int]) -> list[float] | None:
        kept = [i for i in range(len(accepted)) if i not in out]
        try:
            shares = dict(zip(kept, normalize([accepted[i][2].weight for i in kept], max_weight_share)))
        except AggregationError:  # e.g. a weight cap no longer feasible
            return None
        return [eta * shares[i] * built.clients[i].scaling for i in members if i not in out]

    found = merge_culprits(
        weight, a_list, b_list, [built.clients[i].scaling for i in members],
        [built.clients[i].coefficient for i in members], members, len(accepted), coefficients_without,
    )  # fmt: skip
    if found is None:
        raise AggregationError(
            f"the {STRATEGY} merge makes {tensor} non-finite ({what}) whichever clients are left out "
            "(server_learning_rate out of range?)"
        )
    if found[1]:
        return {i: f"its update makes {tensor} non-finite (overflow: its own term alone does, {what})" for i in found[0]}
    return {
        i: f"its update makes {tensor} non-finite (overflow: with the others' updates, {what}; "
        f"left out as the largest, update norm {norm:.6g})"
        for i, norm in found[0].items()
    }


def aggregate_stacked(
    previous: Path,
    clients: Sequence[Path],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    options: Mapping[str, float] | None = None,
    min_clients: int | None = None,
    max_weight_share: float | None = None,
    max_samples: Sequence[int | None] | None = None,
) -> dict:
    """Stacks the clients' adapters into the round's exact update and merges it into the
    canonical base (see the module docstring); returns what it wrote to
    ``out/aggregation.json``. ``max_samples``: per client (in the order of ``clients``), the most
    num_samples its metrics.json may claim; a client claiming more is left out. So is one whose
    update makes an output non-finite: then again from a fresh staging folder."""
    started = time.perf_counter()
    previous, out = Path(previous), Path(out)
    resolved = check_adapter_options(STRATEGY, dict(options or {}))
    paths, names, min_clients = check_client_inputs(
        previous, clients, out, names=names, min_clients=min_clients,
        max_weight_share=max_weight_share,
    )  # fmt: skip
    given = check_given_weights(names, weights) if weights is not None else None
    bounds = dict(zip(names, check_max_samples(max_samples, len(names))))
    names, paths, given = by_name(names, paths, given)  # the stack order: the clients' names
    base_dir, record = resolve_base(previous)
    base = open_model_folder(base_dir, label="previous canonical base")
    rejected: dict[str, str] = {}
    accepted = _accept(base, names, paths, given, rejected, [bounds[name] for name in names])
    eta = resolved["server_learning_rate"]
    while True:
        if len(accepted) < min_clients:
            raise AggregationError(
                f"only {len(accepted)} of {len(names)} clients passed the checks, min_clients is {min_clients}; "
                + "; ".join(rejected.values())
            )
        built = _stack(base, accepted, eta, max_weight_share)
        found = _factor_culprits(built) or _statistics_culprits(base, accepted, built, eta, max_weight_share)
        if not found:
            try:
                report = _write(
                    out, built, accepted, previous=previous, base=base, base_dir=base_dir, record=record,
                    resolved=resolved, rejected=rejected, min_clients=min_clients,
                    max_weight_share=max_weight_share, started=started,
                )  # fmt: skip
                break
            except NonFiniteMerge as error:  # the staged folder is gone: stack again without them
                found = _merge_culprits(base, accepted, built, error, eta, max_weight_share)
        for index, reason in sorted(found.items()):
            logger.info("client %r fails its checks: %s", accepted[index][0], reason)
            rejected[accepted[index][0]] = f"client {accepted[index][0]!r}: {reason}"
        accepted = [c for i, c in enumerate(accepted) if i not in found]
    for name, reason in rejected.items():
        logger.warning("client %r was left out of the aggregation: %s", name, reason)
    logger.info(
        "stacked %d adapters (rank %d) into %s and merged the canonical base in %.2f s (global update norm %.6g)",
        len(accepted), report["adapter"]["stacked_rank"], out, report["seconds"], report["global_update_norm"],
    )  # fmt: skip
    return report


def _write(
    out: Path, built: _Stack, accepted: Sequence[tuple], *, previous: Path, base: ModelFolder,
    base_dir: Path, record: BaseHashes | None, resolved: dict, rejected: Mapping[str, str],
    min_clients: int, max_weight_share: float | None, started: float,
) -> dict:
    """The staged output: the canonical base merged, the update, the hashes, the report."""
    stack, modules, eta = built.clients, built.modules, resolved["server_learning_rate"]
    global_norm = math.sqrt(built.change_squared)
    with staged_folder(out) as stage:
        (stage / BASE_DIR).mkdir()
        try:
            update = StackedUpdate(stack, modules, eta, built.tensors)
            merged = merge_into(stage / BASE_DIR, base, update.layers(), tensor_hashes=True, statistics=True)
        except NonFiniteMerge:
            raise  # the caller leaves out the clients that caused it
        except StackedUpdateError as error:
            raise AggregationError(str(error)) from None
        if record is not None:  # this machine's own canonical base, as the last round left it
            try:
                compare_hashes(merged.input, record, folder=base_dir, label=f"previous canonical base {base_dir}")
            except BaseHashError as error:
                raise AggregationError(f"{error} (its {HASHES_FILE} records otherwise)") from None
        update = StackedUpdate(stack, modules, eta, built.tensors, merged.input, merged.output)
        update_files = write_stacked_update(stage / UPDATE_DIR, update)
        write_base_hashes(stage / HASHES_FILE, merged.output)
        output_files = {f"{UPDATE_DIR}/{k}": v for k, v in update_files.items()}
        output_files.update({f"{BASE_DIR}/{k}": v for k, v in merged.output.files.items()})
        from xffl_tasks.base_hashes import sha256_of

        output_files[HASHES_FILE] = sha256_of(stage / HASHES_FILE)
        update_bytes = sum((stage / UPDATE_DIR / name).stat().st_size for name in update_files)
        layers = {
            name[: -len(".weight")]: {"rank": modules[name[: -len(".weight")]].rank, **figures}
            for name, figures in sorted(merged.layers.items())
        }
        losses = [layer["rounding_loss"] for layer in layers.values()]
        report = {
            "format": REPORT_FORMAT,
            "strategy": STRATEGY,
            "options": resolved,
            "weighted": True,
            "exact": True,
            "previous": str(previous),
            "output": str(out),
            "clients": _clients_report(accepted, built.normalized, stack, built.squared, built.dots, global_norm),
            "previous_files": dict(sorted(merged.input.files.items())),
            "output_files": dict(sorted(output_files.items())),
            "server_state_rounds": None,
            "tensors_aggregated": len(modules),
            "elements_aggregated": sum(m.shape[0] * m.shape[1] for m in modules.values()),
            "global_update_norm": global_norm,
            "bytes_read": merged.bytes_read + sum(a.bytes_read for _, a, _ in accepted),
            "bytes_written": merged.bytes_written + update_bytes,
            "adapter": {
                "ranks": {c.name: c.r for c in stack},
                "alphas": {c.name: c.alpha for c in stack},
                "target_modules": sorted({m for _, a, _ in accepted for m in a.settings.target_modules}),
                "layers": len(modules),
                "stacked_rank": max(m.rank for m in modules.values()),
            },
            "stacked_update": {
                "path": str(out / UPDATE_DIR),
                "files": dict(sorted(update_files.items())),
                "bytes": update_bytes,
            },
            "canonical_base": {
                "path": str(out / BASE_DIR),
                "files": dict(sorted(merged.output.files.items())),
                "hashes_file": str(out / HASHES_FILE),
                "previous": str(base_dir),
                "previous_files": dict(sorted(merged.input.files.items())),
            },
            "merge": {
                "seconds": round(merged.seconds, 3),
                "threads": 1,
                "max_rounding_loss": max(losses) if losses else None,
            },
            "layers": layers,
            "rejected": dict(rejected),
            "min_clients": min_clients,
            "max_weight_share": max_weight_share,
        }
        report["seconds"] = round(time.perf_counter() - started, 3)
        with open(stage / REPORT_FILE, "x", encoding="utf-8") as file:
            file.write(json.dumps(report, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
    return report


def _clients_report(accepted, normalized, stack, squared, dots, global_norm) -> list[dict]:
    return [
        client_entry(client, share, squared[index], dots[index], global_norm,
                     {"r": stack[index].r, "alpha": stack[index].alpha,
                      "coefficient": stack[index].coefficient})
        for index, (client, share) in enumerate(zip(accepted, normalized))
    ]  # fmt: skip
