"""LoRA training and merging on the tiny model: ``python -m xffl_tasks.train --peft lora`` and
``--adapter DIR`` write a PEFT adapter folder (base frozen), ``--no-lora-train-a`` keeps A, and
``python -m xffl_tasks.merge`` writes a full model that matches base + adapter.

Starts: the training task twice as subprocesses (one process each, to their end); the merge
runs in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xffl_tasks.adapter import LoraSettings, initial_adapter, read_adapter_config
from xffl_tasks.aggregate.safetensors_format import read_header
from xffl_tasks.merge import MergeError, merge
from xffl_tasks.merge import main as merge_main
from xffl_tasks.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[3]
FAST = ["--seq-len", "64", "--batch-size", "8", "--learning-rate", "0.01", "--threads", "1"]


def train(tiny: Path, out: Path, *extra: str) -> dict:
    argv = [sys.executable, "-m", "xffl_tasks.train", "--model", str(tiny / "model"),
            "--data", str(tiny / "data" / "italian"), "--out", str(out), *FAST, *extra]  # fmt: skip
    result = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    fresh = tmp / "fresh"
    metrics = train(tiny, fresh, "--peft", "lora", "--lora-r", "4", "--max-steps", "20")
    start = initial_adapter(tiny / "model", tmp / "start", LoraSettings(r=4), seed=3)
    frozen = tmp / "frozen"
    train(tiny, frozen, "--adapter", str(start), "--no-lora-train-a", "--max-steps", "5")
    return {"fresh": fresh, "metrics": metrics, "start": start, "frozen": frozen, "tmp": tmp}


def test_peft_training_writes_an_adapter_folder_and_lowers_the_loss(runs):
    fresh, metrics = runs["fresh"], runs["metrics"]
    assert sorted(p.name for p in fresh.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.json",
    ]  # fmt: skip
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["hyperparameters"]["peft"] == "lora"
    assert read_adapter_config(fresh) == LoraSettings(r=4)
    tensors = load_file(str(fresh / "adapter_model.safetensors"))
    assert len(tensors) == 4 * 4 * 2  # 4 layers x q, k, v, o x (A, B)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(
        float(t.abs().sum()) > 0 for n, t in tensors.items() if "lora_B" in n
    )  # B moved from 0


def test_frozen_a_training_keeps_a_and_the_input_layout(runs):
    before = load_file(str(runs["start"] / "adapter_model.safetensors"))
    after = load_file(str(runs["frozen"] / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        if "lora_A" in name:
            assert torch.equal(before[name], after[name])
        else:
            assert float(before[name].abs().sum()) == 0 and float(after[name].abs().sum()) > 0
    assert (runs["frozen"] / "adapter_config.json").read_text() == (
        runs["start"] / "adapter_config.json"
    ).read_text()


def test_adapter_and_peft_together_is_a_config_error(runs, tiny, tmp_path, capsys):
    code = train_main(["--model", str(tiny / "model"), "--data", str(tiny / "data" / "italian"),
                       "--out", str(tmp_path / "o"), "--adapter", str(runs["start"]), "--peft", "lora"])  # fmt: skip
    assert code == 2 and "give one" in capsys.readouterr().err


def test_merge_matches_base_plus_adapter_and_keeps_the_layout(runs, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = runs["tmp"] / "merged"
    assert (
        merge_main(
            ["--base", str(tiny / "model"), "--adapter", str(runs["fresh"]), "--out", str(out)]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tiny / "model").iterdir()
    )
    assert (
        read_header(out / "model.safetensors").header_bytes
        == read_header(tiny / "model" / "model.safetensors").header_bytes
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged")]
    tokens = torch.tensor([[1, 17, 230, 5, 99, 1000, 7, 2]])
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))
    adapted = PeftModel.from_pretrained(base, str(runs["fresh"])).eval()
    with torch.no_grad():
        expected, got = adapted(tokens).logits, merged(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))(tokens).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter did change the model
    with pytest.raises(MergeError, match="already exists"):
        merge(tiny / "model", runs["fresh"], out)
