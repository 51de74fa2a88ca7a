"""The training task end to end on the tiny model: ``python -m xffl_tasks.train`` alone, under
``torchrun`` with two CPU processes (DDP over gloo, and FSDP2), and on every bad input.

Starts: the training task as subprocesses (one process; ``torchrun`` with two workers, twice),
each run to its end, and one more stopped by SIGTERM (killed by PID if it outlives the test);
the bad-input and format cases run the task's ``main`` in this process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xffl_tasks.tiny import TinyModelSpec, make_tiny
from xffl_tasks.train.__main__ import main
from xffl_tasks.train.checkpoint import inspect_model_folder

REPO = Path(__file__).resolve().parents[3]
FAST = ["--seq-len", "64", "--batch-size", "8", "--learning-rate", "0.003"]


def train_command(tiny: Path, out: Path, *extra: str, corpus: str = "italian") -> list[str]:
    return [
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "data" / corpus),
        "--out",
        str(out),
        *extra,
    ]


def run_cli(argv: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    result = run_cli(
        [
            sys.executable,
            "-m",
            "xffl_tasks.train",
            *train_command(tiny, out, *FAST, "--max-steps", "30", "--threads", "1"),
        ]
    )
    assert result.returncode == 0, result.stderr
    return out


def test_training_lowers_the_validation_loss(trained):
    metrics = metrics_of(trained)
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.5, metrics
    assert metrics["steps"] == 30
    assert metrics["num_samples"] == 30 * 8
    assert metrics["num_tokens"] == 30 * 8 * 64
    assert (
        metrics["world_size"] == 1 and metrics["launcher"] == "single" and metrics["threads"] == 1
    )
    assert metrics["tokens_per_second"] == pytest.approx(metrics["num_tokens"] / metrics["seconds"])
    assert set(metrics["versions"]) >= {"python", "torch", "transformers", "safetensors"}
    assert metrics["seed"] == 0 and metrics["hyperparameters"]["learning_rate"] == 0.003
    assert leftovers(trained) == []


def test_output_has_the_input_tensors_and_stays_tied(tiny, trained):
    source, written = inspect_model_folder(tiny / "model"), inspect_model_folder(trained)
    assert written.tensors == source.tensors
    assert "lm_head.weight" not in written.tensors
    assert json.loads((trained / "config.json").read_text()) == json.loads(
        (tiny / "model" / "config.json").read_text()
    )
    assert (trained / "tokenizer.json").read_bytes() == (
        tiny / "model" / "tokenizer.json"
    ).read_bytes()


def test_output_reloads_generates_and_holds_the_trained_weights(tiny, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xffl_tasks.data.dataset import load_dataset
    from xffl_tasks.launch import resolve_launch
    from xffl_tasks.train.config import TrainingConfig
    from xffl_tasks.train.distributed import resolve_runtime
    from xffl_tasks.train.loop import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(trained), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(trained), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer("Oggi è lunedì,", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert generated.shape[1] == prompt.shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0]), str)
    # The saved weights are the ones evaluated after training.
    dataset = load_dataset(tiny / "data" / "italian", tokenizer=tokenizer, seq_len=64)
    runtime = resolve_runtime(TrainingConfig(device="cpu"), resolve_launch({}))
    assert evaluate(model, dataset.validation, runtime, batch_size=8).loss == pytest.approx(
        metrics_of(trained)["val_loss_after"], rel=1e-4
    )


@pytest.fixture(scope="module")
def two_process_runs(torchrun_two):
    # torchrun, two workers: 8 steps of 2 x 4 sequences of 64 tokens (Czech), fp32, one thread each
    return {
        parallelism: torchrun_two("--parallelism", parallelism) for parallelism in ("ddp", "fsdp")
    }


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_two_processes_write_one_checkpoint(tiny, two_process_runs, parallelism):
    out = two_process_runs[parallelism]
    metrics = metrics_of(out)
    assert (metrics["world_size"], metrics["launcher"], metrics["parallelism"]) == (
        2,
        "torchrun",
        parallelism,
    )
    assert metrics["num_samples"] == 8 * 4 * 2
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"
    ]
    assert leftovers(out) == []
    assert inspect_model_folder(out).tensors == inspect_model_folder(tiny / "model").tensors


def test_fsdp_trains_as_ddp_does(two_process_runs):
    ddp, fsdp = (metrics_of(two_process_runs[p]) for p in ("ddp", "fsdp"))
    assert fsdp["val_loss_before"] == pytest.approx(ddp["val_loss_before"], rel=1e-5)
    assert fsdp["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-3)
    assert fsdp["val_loss_after"] == pytest.approx(ddp["val_loss_after"], rel=1e-3)


# -- bad input ---------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def copy_model(tiny: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in (tiny / "model").iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _missing(tiny, tmp):
    return tmp / "no-model", tiny / "data" / "italian", []


def _corrupt_config(tiny, tmp):
    model = copy_model(tiny, tmp / "model")
    (model / "config.json").write_text('{"model_type": "llama",')
    return model, tiny / "data" / "italian", []


def _corrupt_weights(tiny, tmp):
    model = copy_model(tiny, tmp / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model, tiny / "data" / "italian", []


def _pickle(tiny, tmp):
    model = copy_model(tiny, tmp / "model")
    (model / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    return model, tiny / "data" / "italian", []


def _empty_data(tiny, tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").write_text("\n\n")
    return tiny / "model", tmp / "data", []


def _unreadable_data(tiny, tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").write_bytes(bytes(range(128, 256)) * 10)
    return tiny / "model", tmp / "data", []


def _seq_len_beyond(tiny, tmp):
    return tiny / "model", tiny / "data" / "italian", ["--seq-len", "4096"]


def _non_finite(tiny, tmp):
    return (
        tiny / "model",
        tiny / "data" / "italian",
        ["--seq-len", "64", "--learning-rate", "1e30", "--max-steps", "5"],
    )


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        (_missing, 2, "no-model: no such model folder"),
        (_corrupt_config, 2, "config.json: corrupt: not valid JSON"),
        (_corrupt_weights, 2, "model.safetensors: truncated"),
        (
            _pickle,
            2,
            "pytorch_model.bin: pickle checkpoint refused: only safetensors weights are loaded",
        ),
        (_empty_data, 2, "train.jsonl: no training text"),
        (_unreadable_data, 2, "train.jsonl: not UTF-8 text"),
        (
            _seq_len_beyond,
            2,
            "seq_len: 4096 is beyond the model's context of 256 tokens (max_position_embeddings in",
        ),
        (_non_finite, 1, "training diverged; lower learning_rate"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_bad_input_stops_with_one_clear_line_and_no_output(
    tiny, tmp_path, capsys, offline, case, status, message
):
    model, data, extra = case(tiny, tmp_path)
    out = tmp_path / "runs" / "out"
    assert main(["--model", str(model), "--data", str(data), "--out", str(out), *extra]) == status
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("xffl-train")
    ]
    assert len(errors) == 1 and errors[0].startswith("xffl-train: error: "), errors
    assert message in errors[0]
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_bad_input_exit_status_from_the_command_line(tiny, tmp_path):
    model, data, _ = _pickle(tiny, tmp_path)
    argv = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "out")]
    result = run_cli([sys.executable, "-m", "xffl_tasks.train", *argv])
    assert result.returncode == 2
    expected = (
        f"xffl-train: error: {model / 'pytorch_model.bin'}: pickle checkpoint refused: only safetensors weights are "
        "loaded (convert it with save_pretrained where it can be trusted)"
    )
    assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_the_run_and_leaves_no_output(tiny, tmp_path):
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "xffl_tasks.train",
        *train_command(tiny, out, *FAST, "--max-steps", "100000", "--threads", "1"),
    ]
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, (
                "the run never started writing"
            )
            time.sleep(0.2)
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("xffl-train: error: terminated by SIGTERM")
    assert list(tmp_path.iterdir()) == []


# -- formats -----------------------------------------------------------------------------


def test_bf16_untied_model_keeps_dtype_names_and_shards(tmp_path, offline):
    tiny = make_tiny(tmp_path / "tiny", seed=1, spec=TinyModelSpec(dtype="bfloat16", tie_word_embeddings=False),
                     train_documents=300, validation_documents=40)  # fmt: skip
    out = tmp_path / "out"
    assert (
        main([*train_command(tiny, out, *FAST, "--max-steps", "3", "--max-shard-size", "1MB")]) == 0
    )
    source, written = inspect_model_folder(tiny / "model"), inspect_model_folder(out)
    assert written.tensors == source.tensors
    assert set(source.tensors.values()) == {"BF16"} and "lm_head.weight" in source.tensors
    assert len(written.weight_files) > 1 and (out / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_config_file_pretokenised_data_and_accumulation(tiny, tmp_path, offline):
    from xffl_tasks.data.pretokenize import main as pretokenize

    tokens = tmp_path / "tokens"
    assert (
        pretokenize(
            [
                "--model",
                str(tiny / "model"),
                "--data",
                str(tiny / "data" / "czech"),
                "--out",
                str(tokens),
            ]
        )
        == 0
    )
    out = tmp_path / "out"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": str(tiny / "model"), "data": str(tokens), "out": str(out), "seq_len": 32,
                                  "batch_size": 4, "gradient_accumulation": 2, "max_steps": 2, "lr_schedule": "constant",
                                  "warmup_steps": 1}))  # fmt: skip
    assert main(["--config", str(config), "--learning-rate", "0.001"]) == 0
    metrics = metrics_of(out)
    assert metrics["data"]["kind"] == "pre-tokenised"
    assert (metrics["num_samples"], metrics["num_tokens"], metrics["steps"]) == (16, 16 * 32, 2)
    assert metrics["hyperparameters"]["learning_rate"] == 0.001
    assert metrics["learning_rate_last"] == 0.001
