"""A 3-round LoRA campaign under a real scheduler and triggerer on the two local facilities:
the base model is pushed once and stays, each round moves only the adapter, the weighted
validation loss falls, the manifest chain verifies; then its release run publishes the best
round's adapter merged into the base: a model transformers loads, whose outputs are those of
the base with the adapter applied.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance`` (api-server,
scheduler, dag-processor, triggerer on SQLite), stopped at the end of the session by PID; the
merge and the verification as subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import run_campaign
from xffl_testbed.campaign import wait_for_campaign, wait_for_release

pytestmark = pytest.mark.slow

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
LORA_TRAINING = {"max_steps": 30, "learning_rate": 0.02, "threads": 1, "seed": 0, "batch_size": 8, "seq_len": 64,
                 "peft": {"method": "lora", "r": 8, "alpha": 16}}  # fmt: skip


def test_three_round_lora_campaign_moves_only_adapters(
    airflow_instance, testbed, corpora, tiny, storage
):
    dag_id = run_campaign(
        airflow_instance, testbed, corpora, tiny, storage, campaign="lora",
        training=LORA_TRAINING, aggregation={"strategy": "lora-svd"}, convergence={"max_rounds": 3},
        release={"approval": False},
    )  # fmt: skip
    runs = wait_for_campaign(airflow_instance, dag_id, "lora", storage / "lora", timeout=1500)
    assert [r["state"] for r in runs] == ["success"] * 3, runs
    manifests = [
        json.loads((storage / "lora" / f"round-{n:04d}" / "manifest.json").read_text())
        for n in range(3)
    ]
    losses = [m["weighted_val_loss"] for m in manifests]
    assert manifests[-1]["weighted_val_loss_after"] < losses[0], losses
    assert losses[-1] < losses[0], losses
    base_files = sorted(p.name for p in (tiny / "model").iterdir())
    for number, manifest in enumerate(manifests):
        assert manifest["participants"] == ["site1", "site2"]
        assert sorted(manifest["inputs"]["model_files"]) == ADAPTER_FILES
        assert sorted(manifest["inputs"]["base_model_files"]) == base_files
        for name in ("site1", "site2"):
            facility = manifest["facilities"][name]
            assert facility["push"]["files"] == ADAPTER_FILES
            assert facility["pull"]["files"] == [*ADAPTER_FILES, "metrics.json"]
            base = facility["push_base"]
            if number == 0:  # sent once ...
                assert base["bytes_sent"] == base["bytes_total"] > 0
            else:  # ... then kept at the facility: only hashed
                assert base["bytes_sent"] == 0 and base["bytes_skipped"] == base["bytes_total"]
            assert facility["pull"]["bytes_total"] < base["bytes_total"] / 2
        assert manifest["aggregation"]["strategy"] == "lora-svd"
        assert sorted(p.name for p in (storage / "lora" / f"round-{number:04d}" / "global").iterdir()) == [
            *ADAPTER_FILES, "aggregation.json",
        ]  # fmt: skip
    assert "MB moved" in (storage / "lora" / "report.txt").read_text()
    verify = subprocess.run(
        [sys.executable, "-m", "xffl_tasks.verify", str(storage / "lora")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    release = wait_for_release(airflow_instance, "lora", "lora", timeout=900)
    assert release["state"] == "success", release
    [folder] = sorted((storage / "_releases" / "lora").glob("[0-9]*"))
    record = json.loads((folder / "release.json").read_text())
    assert record["kind"] == "lora" and sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter", "model",
                                                                                        "release.json"]  # fmt: skip
    check = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(folder)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(folder / "model"), local_files_only=True)
    applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny / "model"), local_files_only=True),
                                        str(folder / "adapter"))  # fmt: skip
    tokens = AutoTokenizer.from_pretrained(str(tiny / "model"))("Oggi è lunedì, e domani", return_tensors="pt").input_ids
    import torch

    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, applied(tokens).logits, atol=1e-4)
