"""``python -m xffl_tasks.evaluate`` on the tiny model: the loss it writes is the training
task's ``val_loss_before`` for the same model and data (a full model, and a LoRA adapter on its
base), several candidates in one job, and bad inputs exit 2 naming the problem.

Starts nothing: the training and the evaluation run their ``main`` in this process, one
thread each (a matrix product's partial sums depend on the thread count).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xffl_tasks.evaluate.__main__ import main as evaluate_main
from xffl_tasks.evaluate.result import read_evaluation
from xffl_tasks.tiny import make_tiny
from xffl_tasks.train.__main__ import main as train_main

SETTINGS = ["--seq-len", "64", "--batch-size", "4", "--threads", "1", "--val-max-sequences", "12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-evaluate")
    return make_tiny(root / "tiny", seed=0, train_documents=240, validation_documents=60)


def train(tiny: Path, out: Path, *flags: str) -> dict:
    argv = ["--model", str(tiny / "model"), "--data", str(tiny / "data" / "italian"), "--out", str(out),
            "--learning-rate", "0.003", *SETTINGS, *flags]  # fmt: skip
    assert train_main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def evaluate(tiny: Path, out: Path, *flags: str) -> dict:
    argv = ["--data", str(tiny / "data" / "italian"), "--out", str(out), *SETTINGS, *flags]
    assert evaluate_main(argv) == 0
    return json.loads((out / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    full = train(tiny, tmp / "full", "--max-steps", "2")
    lora = train(tiny, tmp / "lora", "--peft", "lora", "--lora-r", "4", "--max-steps", "2")
    # training on top of the trained adapter evaluates it first: that run's val_loss_before
    again = train(tiny, tmp / "again", "--adapter", str(tmp / "lora"), "--max-steps", "1")
    return {"dir": tmp, "full": full, "lora": lora, "again": again}


def test_full_models_get_the_training_tasks_losses(tiny, runs, tmp_path):
    trained = runs["dir"] / "full"
    # the training flags pass unchanged; the ones that do not shape the loss have no effect
    record = evaluate(tiny, tmp_path / "eval", "--candidate", f"input={tiny / 'model'}",
                      "--candidate", f"last={trained}", "--learning-rate", "0.5")  # fmt: skip
    assert set(record["candidates"]) == {"input", "last"}
    assert record["candidates"]["input"]["val_loss"] == pytest.approx(
        runs["full"]["val_loss_before"], abs=1e-9
    )
    assert record["candidates"]["last"]["val_loss"] == pytest.approx(
        runs["full"]["val_loss_after"], abs=1e-9
    )
    for entry in record["candidates"].values():
        assert entry["val_tokens"] == runs["full"]["val_tokens"]
        assert entry["val_sequences"] == runs["full"]["val_sequences"] == 12
    assert (record["format"], record["seq_len"], record["seed"], record["batch_size"]) == (
        "xffl-evaluation",
        64,
        0,
        4,
    )
    assert record["world_size"] == 1 and record["threads"] == 1
    assert set(record["versions"]) >= {"torch", "transformers", "xffl_tasks"}
    assert record["started_at"] and record["finished_at"] and record["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["evaluation.json"]
    checked = read_evaluation(tmp_path / "eval", "italy", expected=("last",))
    assert checked.candidates["last"].val_loss == record["candidates"]["last"]["val_loss"]


def test_an_adapter_on_its_base_gets_the_training_tasks_loss(tiny, runs, tmp_path):
    adapter = runs["dir"] / "lora"
    record = evaluate(tiny, tmp_path / "eval", "--base", str(tiny / "model"), "--candidate", f"last={adapter}",
                      "--peft", "lora")  # fmt: skip
    entry = record["candidates"]["last"]
    assert entry["val_loss"] == pytest.approx(runs["again"]["val_loss_before"], abs=1e-9)
    assert entry["val_loss"] == pytest.approx(runs["lora"]["val_loss_after"], abs=1e-9)
    assert entry["val_loss"] != pytest.approx(
        runs["lora"]["val_loss_before"], abs=1e-6
    )  # the adapter counts
    assert entry["adapter"] == str(adapter) and record["base"] == str(tiny / "model")


def _bad(tmp_path: Path, argv: list[str], capsys) -> str:
    assert evaluate_main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2_naming_the_problem(tiny, runs, tmp_path, capsys):
    data, model, out = str(tiny / "data" / "italian"), str(tiny / "model"), str(tmp_path / "out")
    adapter = str(runs["dir"] / "lora")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    pickled_adapter = tmp_path / "pickled-adapter"
    pickled_adapter.mkdir()
    (pickled_adapter / "adapter_model.bin").write_bytes(b"\x80\x04")
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": model, "seq_len": 64}))
    cases = [
        (["--candidate", f"last={model}", "--data", str(tmp_path / "nothing"), "--out", out], "nothing"),
        (["--candidate", f"last={pickled}", "--data", data, "--out", out], "pytorch_model.bin"),
        (["--candidate", f"last={empty}", "--data", data, "--out", out], "no config.json"),
        (["--candidate", f"last={tmp_path / 'missing'}", "--data", data, "--out", out], "no such model folder"),
        (["--candidate", f"last={adapter}", "--data", data, "--out", out], "--base"),
        (["--base", model, "--candidate", f"last={pickled_adapter}", "--data", data, "--out", out], "adapter_model.bin"),
        (["--base", str(pickled), "--candidate", f"last={adapter}", "--data", data, "--out", out], "pytorch_model.bin"),
        (["--candidate", model, "--data", data, "--out", out], "NAME=DIR"),
        (["--candidate", f"a={model}", "--candidate", f"a={model}", "--data", data, "--out", out], "twice"),
        (["--data", data, "--out", out], "--candidate"),
        (["--candidate", f"a={model}", "--data", data], "--out"),
        (["--candidate", f"a={model}", "--data", data, "--out", model], "model folder"),
        (["--candidate", f"a={model}", "--data", data, "--out", out, "--seq-len", "100000"], "seq_len"),
        (["--candidate", f"a={model}", "--out", out, "--config", str(config), "--data", data], "model: not a field"),
    ]  # fmt: skip
    for argv, expected in cases:
        err = _bad(tmp_path, argv, capsys)
        assert err.startswith("xffl-evaluate: error: ") and expected in err, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing is written for a bad input
