"""Campaigns on disk for the release tests: round folders with a global model each and
manifests chained as ``finalize`` writes them (the fields the release reads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from xffl_tasks.manifest import hash_tree, write_manifest

FACILITIES = ("italy", "czechia")
WEIGHTS = {"italy": 0.75, "czechia": 0.25}


def write_base(folder: Path) -> Path:
    """A two-tensor "model" the LoRA merge accepts (safetensors and config only)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
               "model.norm.weight": np.ones(4, dtype=np.float32)}, str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    return folder


def _global_model(folder: Path, number: int, *, lora_base: Path | None) -> None:
    if lora_base is None:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes([number]) * 64)
        (folder / "config.json").write_text('{"model_type": "llama"}\n')
    else:
        from xffl_tasks.adapter import LoraSettings, initial_adapter

        initial_adapter(
            lora_base, folder, LoraSettings(r=2, target_modules=("q_proj",)), seed=number
        )
    (folder / "aggregation.json").write_text(f'{{"round": {number}}}\n')


def make_campaign(
    root: Path,
    losses: Sequence[float | None],
    *,
    name: str = "c1",
    lora_base: Path | None = None,
    privacy: Sequence[Any] | None = None,
) -> Path:
    """``losses[r]``: round r's ``weighted_val_loss`` (the loss of round r-1's global model)."""
    campaign = root / name
    previous = None
    for number, loss in enumerate(losses):
        folder = campaign / f"round-{number:04d}"
        _global_model(folder / "global", number, lora_base=lora_base)
        inputs: dict[str, Any] = {"model": "/models/start"}
        if lora_base is not None:
            inputs["base_model"] = str(lora_base)
            inputs["base_model_files"] = hash_tree(lora_base)
        manifest = {
            "campaign": name, "round": number, "weighted_val_loss": loss,
            "outputs": {f"global/{k}": v for k, v in hash_tree(folder / "global").items()},
            "participants": list(FACILITIES), "weights": dict(WEIGHTS), "inputs": inputs,
            "aggregation": {"strategy": "fedavg"},
            "started_at": f"2026-01-0{1 + number % 9}T10:00:00+00:00",
            "finished_at": f"2026-01-0{1 + number % 9}T11:00:00+00:00",
            "decision": {"stop": number == len(losses) - 1, "reason": "reached max_rounds"},
        }  # fmt: skip
        if privacy is not None and privacy[number] is not None:
            manifest["privacy"] = privacy[number]
        previous = write_manifest(folder, manifest, previous)
    return campaign


@pytest.fixture
def campaign(tmp_path):
    """Four rounds; the global model of round 1 is the best (2.0), the last's is 2.2."""
    return make_campaign(tmp_path / "storage", [3.0, 2.5, 2.0, 2.1])
