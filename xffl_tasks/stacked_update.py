"""The ``lora-stacked`` update folder: a round's exact update as stacked LoRA factors.

A folder of two files, written by the aggregation (``xffl_tasks.aggregate.lora_stacked``) and
merged by every facility into its copy of the base (``xffl_tasks.stacked_merge``):

- ``stacked_update.safetensors``: per adapted base weight ``<module>.weight`` of shape
  ``[out, in]``, ``<module>.stacked_A`` (``[K, in]``) and ``<module>.stacked_B`` (``[out, K]``),
  float32, with ``stacked_B @ stacked_A = sum_i c_i B_i A_i`` over the facilities that adapt
  the module, ``c_i = eta * w_i * alpha_i / r_i`` already in ``stacked_B``: n adapters' bytes.
- ``stacked_update.json``::

    {"format": "xffl-stacked-update/1", "strategy": "lora-stacked",
     "weights_file": "stacked_update.safetensors", "weights_sha256": "<sha256>",
     "server_learning_rate": 1.0,
     "merge": "<how the merge is computed>",
     "clients": [{"name": "cz", "r": 4, "alpha": 8.0, "scaling": 2.0,
                  "normalized_weight": 0.25, "coefficient": 0.5}, ...],
     "modules": {"model.layers.0.self_attn.q_proj": {"weight": "...q_proj.weight",
                  "shape": [out, in], "rank": K, "clients": ["cz", "it"]}, ...},
     "base": <base_hashes record of the base it applies to, or null>,
     "result": <base_hashes record of the canonical merged base, or null>}

  ``clients`` is the stack order; each module's ``clients`` lists who contributes to it, in
  that order, ``r`` columns each (so ``rank`` is the sum of their ``r``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.base_hashes import BaseHashError, BaseHashes

UPDATE_FORMAT = "xffl-stacked-update/1"
UPDATE_CONFIG = "stacked_update.json"
UPDATE_WEIGHTS = "stacked_update.safetensors"
A_SUFFIX, B_SUFFIX = ".stacked_A", ".stacked_B"
MAX_CONFIG_BYTES = 64 << 20
MERGE_RULE = (
    "W' = dtype(float32(W) + D), D = sum over k in stack order of stacked_B[:, k] * "
    "stacked_A[k, :], each product and sum one float32 operation per element"
)
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MODULE = re.compile(r"^[A-Za-z0-9_.]{1,512}$")


class StackedUpdateError(ValueError):
    """A stacked update folder is malformed or does not fit the base; names the field or tensor."""


@dataclass(frozen=True)
class StackedClient:
    """One facility's place in the stack."""

    name: str
    r: int
    alpha: float
    normalized_weight: float
    coefficient: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class StackedModule:
    """One adapted base weight: its tensor name, shape, stacked rank and contributors."""

    module: str
    shape: tuple[int, int]
    clients: tuple[str, ...]
    rank: int

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def a_key(self) -> str:
        return f"{self.module}{A_SUFFIX}"

    @property
    def b_key(self) -> str:
        return f"{self.module}{B_SUFFIX}"


@dataclass(frozen=True)
class StackedUpdate:
    """A stacked update, read and checked; ``tensors`` holds the stacked factors (float32)."""

    clients: tuple[StackedClient, ...]
    modules: dict[str, StackedModule]
    server_learning_rate: float
    tensors: dict[str, Any]
    base: BaseHashes | None = None
    result: BaseHashes | None = None
    weights_sha256: str | None = None

    def layers(self) -> dict[str, tuple[Any, Any]]:
        """Base weight name -> ``(stacked_A, stacked_B)``."""
        return {
            m.weight: (self.tensors[m.a_key], self.tensors[m.b_key]) for m in self.modules.values()
        }

    def describe(self) -> dict[str, Any]:
        """The JSON form (``weights_sha256`` as recorded)."""
        return {
            "format": UPDATE_FORMAT,
            "strategy": "lora-stacked",
            "weights_file": UPDATE_WEIGHTS,
            "weights_sha256": self.weights_sha256,
            "server_learning_rate": self.server_learning_rate,
            "merge": MERGE_RULE,
            "clients": [
                {
                    "name": c.name,
                    "r": c.r,
                    "alpha": c.alpha,
                    "scaling": c.scaling,
                    "normalized_weight": c.normalized_weight,
                    "coefficient": c.coefficient,
                }
                for c in self.clients
            ],
            "modules": {
                m.module: {
                    "weight": m.weight,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "clients": list(m.clients),
                }
                for m in sorted(self.modules.values(), key=lambda m: m.module)
            },
            "base": self.base.to_json() if self.base else None,
            "result": self.result.to_json() if self.result else None,
        }


def write_stacked_update(folder: Path, update: StackedUpdate) -> dict[str, str]:
    """Writes the two files into ``folder`` (a fresh folder inside the caller's staging
    folder, which is renamed into place whole); returns their sha256 by name."""
    import torch
    from safetensors.torch import save_file

    check_update(update, where=str(folder))
    tensors = {}
    for module in sorted(update.modules.values(), key=lambda m: m.module):
        tensors[module.a_key] = update.tensors[module.a_key].to(torch.float32).contiguous()
        tensors[module.b_key] = update.tensors[module.b_key].to(torch.float32).contiguous()
    folder.mkdir()
    save_file(tensors, str(folder / UPDATE_WEIGHTS), metadata={"format": "pt"})
    digest = _sha256(folder / UPDATE_WEIGHTS)
    described = update.describe()
    described["weights_sha256"] = digest
    text = json.dumps(described, indent=1) + "\n"
    (folder / UPDATE_CONFIG).write_text(text, encoding="utf-8")
    return {UPDATE_CONFIG: hashlib.sha256(text.encode()).hexdigest(), UPDATE_WEIGHTS: digest}


def _sha256(path: Path) -> str:
    from xffl_tasks.base_hashes import sha256_of

    return sha256_of(path)


def _number(value: object, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StackedUpdateError(f"{where}: must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise StackedUpdateError(f"{where}: must be positive, got {value!r}")
    return float(value)


def _clients(raw: object, where: str) -> tuple[StackedClient, ...]:
    if not isinstance(raw, list) or not raw:
        raise StackedUpdateError(f"{where}: clients must be a non-empty list")
    clients, seen = [], set()
    for index, entry in enumerate(raw):
        at = f"{where}: clients[{index}]"
        if not isinstance(entry, Mapping):
            raise StackedUpdateError(f"{at}: must be an object")
        name, r = entry.get("name"), entry.get("r")
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in seen:
            raise StackedUpdateError(f"{at}: name must be a new short name, got {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 4096:
            raise StackedUpdateError(f"{at}: r must be a whole number from 1 to 4096, got {r!r}")
        seen.add(name)
        clients.append(
            StackedClient(
                name,
                r,
                _number(entry.get("alpha"), f"{at}: alpha"),
                _number(entry.get("normalized_weight"), f"{at}: normalized_weight"),
                _number(entry.get("coefficient"), f"{at}: coefficient", positive=False),
            )
        )
    return tuple(clients)


def _modules(raw: object, clients: Sequence[StackedClient], where: str) -> dict[str, StackedModule]:
    if not isinstance(raw, Mapping) or not raw:
        raise StackedUpdateError(f"{where}: modules must map module names to their stacks")
    ranks = {c.name: c.r for c in clients}
    order = [c.name for c in clients]
    modules = {}
    for module, entry in raw.items():
        at = f"{where}: modules: {str(module)[:200]}"
        if not isinstance(module, str) or not MODULE.fullmatch(module):
            raise StackedUpdateError(f"{at}: not a module name")
        if not isinstance(entry, Mapping):
            raise StackedUpdateError(f"{at}: must be an object")
        shape, names = entry.get("shape"), entry.get("clients")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise StackedUpdateError(f"{at}: shape must be [out, in], got {shape!r}")
        if (
            not isinstance(names, list)
            or not names
            or any(n not in ranks for n in names)
            or names != sorted(set(names), key=order.index)
        ):
            raise StackedUpdateError(f"{at}: clients must list some of the clients, in stack order")
        rank = sum(ranks[n] for n in names)
        if entry.get("rank") != rank or entry.get("weight") != f"{module}.weight":
            raise StackedUpdateError(
                f"{at}: rank must be {rank} (the sum of its clients' r) and weight {module}.weight"
            )
        modules[module] = StackedModule(module, (shape[0], shape[1]), tuple(names), rank)
    return modules


def check_update(update: StackedUpdate, *, where: str) -> None:
    """The stacked factors match the description: names, float32, ``[K, in]`` and ``[out, K]``,
    finite values; raises :class:`StackedUpdateError` naming the tensor."""
    import torch

    expected = {k for m in update.modules.values() for k in (m.a_key, m.b_key)}
    extra, missing = sorted(set(update.tensors) - expected), sorted(expected - set(update.tensors))
    if extra or missing:
        raise StackedUpdateError(
            f"{where}: tensor {(extra or missing)[0]!r} "
            + ("is not described in " + UPDATE_CONFIG if extra else "is missing")
        )
    for module in update.modules.values():
        rows, columns = module.shape
        for key, shape in ((module.a_key, (module.rank, columns)), (module.b_key, (rows, module.rank))):
            tensor = update.tensors[key]
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
                raise StackedUpdateError(
                    f"{where}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')} "
                    f"{list(tensor.shape)}, expected float32 {list(shape)}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise StackedUpdateError(f"{where}: tensor {key!r} holds NaN or Inf")


def read_stacked_update(folder: str | Path, *, load_tensors: bool = True) -> StackedUpdate:
    """Reads and checks a stacked update folder: the JSON (bounded, every field), the weights'
    sha256 against the recorded one, and (``load_tensors``) the factors themselves."""
    folder = Path(folder)
    where = f"stacked update {folder}"
    if not folder.is_dir():
        raise StackedUpdateError(f"{where}: not a folder")
    for entry in folder.iterdir():
        if entry.name.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")):
            raise StackedUpdateError(f"{where}: pickle file {entry.name!r} is refused")
    try:
        with open(folder / UPDATE_CONFIG, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise StackedUpdateError(f"{where}: cannot read {UPDATE_CONFIG}: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise StackedUpdateError(f"{where}: {UPDATE_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StackedUpdateError(f"{where}: {UPDATE_CONFIG} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != UPDATE_FORMAT:
        raise StackedUpdateError(f"{where}: {UPDATE_CONFIG} is not an {UPDATE_FORMAT} file")
    if data.get("weights_file") != UPDATE_WEIGHTS:
        raise StackedUpdateError(f"{where}: weights_file must be {UPDATE_WEIGHTS}")
    at = f"{where}: {UPDATE_CONFIG}"
    clients = _clients(data.get("clients"), at)
    modules = _modules(data.get("modules"), clients, at)
    eta = _number(data.get("server_learning_rate"), f"{at}: server_learning_rate")
    records = {}
    for key in ("base", "result"):
        try:
            records[key] = (
                BaseHashes.from_json(data[key], where=f"{at}: {key}") if data.get(key) else None
            )
        except BaseHashError as error:
            raise StackedUpdateError(str(error)) from None
    recorded = data.get("weights_sha256")
    weights = folder / UPDATE_WEIGHTS
    if not weights.is_file():
        raise StackedUpdateError(f"{where}: no {UPDATE_WEIGHTS}")
    tensors: dict[str, Any] = {}
    if load_tensors:
        from safetensors.torch import load

        from xffl_tasks.aggregate.safetensors_format import HeaderError, read_header

        try:
            read_header(weights)  # the format checked before any tensor is built
        except HeaderError as error:
            raise StackedUpdateError(f"{where}: {UPDATE_WEIGHTS}: {error}") from None
        blob = weights.read_bytes()
        if hashlib.sha256(blob).hexdigest() != recorded:
            raise StackedUpdateError(
                f"{where}: {UPDATE_WEIGHTS} does not have the sha256 {UPDATE_CONFIG} records (damaged in transit?)"
            )
        tensors = load(blob)
    update = StackedUpdate(clients, modules, eta, tensors, records["base"], records["result"], recorded)
    if load_tensors:
        check_update(update, where=where)
    return update
