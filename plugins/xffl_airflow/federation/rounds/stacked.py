"""What a ``lora-stacked`` round starts from (docs/aggregation.md, "lora-stacked").

Each round's aggregation writes the exact update as stacked factors (``global/stacked_update/``)
and the canonical next base (``global/base/``, every file's and tensor's sha256 in
``global/base_hashes.json``). The facilities keep their own merged base:

- round 0 pushes the base model (or a warm start's canonical base) to ``<campaign>/base``, and
  every facility trains a fresh adapter of its own rank on it;
- round k pushes round k-1's update; a facility merges it into its round k-1 base (the same
  function as the aggregation's, bit for bit, checked against the update's hashes) and trains a
  fresh adapter on the result;
- a facility that did not train in round k-1 (its job failed, its base diverged: exit 2, the
  tensor named) cannot merge: this round pushes it the canonical base instead (catch-up).

The aggregation's ``previous`` (``input_model``) is the base model in round 0, round k-1's
global folder after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import PlanError, RoundError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.names import FederationDag
from xffl_tasks.manifest import read_manifest

UPDATE = "stacked_update"
UPDATE_MARKER = "stacked_update/stacked_update.json"


@dataclass(frozen=True)
class StackedInputs:
    """The round's input (the aggregation's ``previous``), the update pushed (None in round 0),
    the base source pushed to catching-up facilities, and who catches up."""

    input_model: Path
    update: Path | None
    update_sha256: dict[str, str]
    base: Path
    base_sha256: dict[str, str] | None
    catch_up: frozenset[str] = field(default_factory=frozenset)


def _outputs(manifest: dict[str, Any], prefix: str) -> dict[str, str]:
    outputs = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
    return {k.removeprefix(prefix): v for k, v in outputs.items() if k.startswith(prefix)}


def _trained_last_round(dag: FederationDag, campaign: str, round_number: int, names: list[str]) -> set[str]:
    """The facilities whose training succeeded in round ``round_number`` under its plan."""
    from xffl_airflow.federation.rounds.store import load_plan, step_result

    try:
        sealed = load_plan(dag, campaign, round_number)
    except PlanError:
        return set()
    return {name for name in names if step_result(sealed, name, "train") is not None}


def stacked_inputs(config: Any, dag: FederationDag, layout: CampaignLayout, round_number: int,
                   warm: dict[str, Any] | None) -> StackedInputs:  # fmt: skip
    names = [f.name for f in config.facilities]
    if round_number == 0:
        if warm is not None:  # a finished lora-stacked campaign's last output: its canonical base
            source = Path(warm["model"])
            manifest = read_manifest(warm["manifest"]) or {}
            return StackedInputs(source, None, {}, source / "base", _outputs(manifest, "global/base/") or None)
        base = Path(config.base_model)
        if not (base / "config.json").is_file():
            raise RoundError(f"campaign {layout.campaign} round 0: base model {base} is not a model folder")
        return StackedInputs(base, None, {}, base, None)
    previous = layout.global_model(round_number - 1)
    manifest = read_manifest(layout.manifest(round_number - 1))
    if manifest is None:
        raise RoundError(f"campaign {layout.campaign}: round {round_number - 1} has no manifest; it did not finish")
    if not (previous / UPDATE_MARKER).is_file():
        raise RoundError(f"campaign {layout.campaign} round {round_number}: {previous} holds no lora-stacked update")
    trained = _trained_last_round(dag, layout.campaign, round_number - 1, names)
    return StackedInputs(previous, previous / UPDATE, _outputs(manifest, f"global/{UPDATE}/"),
                         previous / "base", _outputs(manifest, "global/base/") or None,
                         frozenset(n for n in names if n not in trained))  # fmt: skip


def adapter_bytes(base: Path, config: Any) -> dict[str, int]:
    """Per facility, the most bytes its new adapter's weights can hold: ``r (rows + columns)``
    float32 values per adapted 2-D weight of the base (read from its headers only)."""
    from xffl_tasks.aggregate.model_folder import open_model_folder

    modules = tuple(config.training.peft.target_modules)
    folder = open_model_folder(base, label="the round's base model")
    per_rank = 0
    for shard in folder.shards:
        for entry in shard.header.tensors:
            parts = entry.name.rsplit(".", 2)
            if len(entry.shape) == 2 and len(parts) == 3 and parts[1] in modules and parts[2] == "weight":
                per_rank += 4 * (entry.shape[0] + entry.shape[1])
    return {f.name: config.lora_rank(f.name)[0] * per_rank for f in config.facilities}
