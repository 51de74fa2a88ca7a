"""The training task's configuration: defaults, JSON file, flags; errors name field and source.
Pure; starts nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xffl_tasks.train.__main__ import parse_arguments
from xffl_tasks.train.config import (
    FIELDS,
    FIELDS_BY_NAME,
    HYPERPARAMETERS,
    ConfigError,
    TrainingConfig,
    build_config,
    check_value,
    from_mapping,
    load_config_file,
    parse_text,
)

PATHS = ["--model", "/m", "--data", "/d", "--out", "/o"]


def test_field_table_matches_the_config_record():
    assert [spec.name for spec in FIELDS] == [f.name for f in dataclasses.fields(TrainingConfig)]
    assert "model" not in HYPERPARAMETERS and "learning_rate" in HYPERPARAMETERS


def test_the_lead_example_hyperparameters_are_known():
    # plugins/xffl_airflow/federation/examples/{local,hpc}.yaml
    for name in ("epochs", "learning_rate", "lr_schedule", "warmup_steps", "batch_size", "gradient_accumulation",
                 "seq_len", "precision", "seed", "max_steps", "threads"):  # fmt: skip
        assert name in HYPERPARAMETERS


def test_defaults_then_file_then_flags(tmp_path):
    config_file = tmp_path / "train.json"
    config_file.write_text(
        json.dumps({"learning_rate": 0.001, "batch_size": 4, "model": "/from-file"})
    )
    config = parse_arguments(
        ["--config", str(config_file), "--data", "/d", "--out", "/o", "--batch-size", "16"]
    )
    assert config.learning_rate == 0.001
    assert config.batch_size == 16
    assert config.model == "/from-file"
    assert config.lr_schedule == "cosine"
    assert config.gradient_checkpointing is False


def test_flags_of_every_kind():
    config = parse_arguments(
        PATHS + ["--learning-rate", "2e-5", "--lr-schedule", "linear", "--max-steps", "30", "--seq-len", "none",
                 "--gradient-checkpointing", "--precision", "bf16", "--val-split", "0.2", "--max-shard-size", "500MB"]
    )  # fmt: skip
    assert (config.learning_rate, config.lr_schedule, config.max_steps, config.seq_len) == (
        2e-5,
        "linear",
        30,
        None,
    )
    assert (config.gradient_checkpointing, config.precision, config.val_split, config.max_shard_size) == (
        True, "bf16", 0.2, "500MB",
    )  # fmt: skip
    assert parse_arguments(PATHS + ["--no-gradient-checkpointing"]).gradient_checkpointing is False


def test_paths_are_required():
    with pytest.raises(ConfigError, match="--model: required"):
        parse_arguments(["--data", "/d", "--out", "/o"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning-rate", "abc"], "--learning-rate: expected a number, got 'abc'"),
        (["--learning-rate", "0"], "--learning-rate: must be greater than 0"),
        (["--learning-rate", "nan"], "--learning-rate: must be a finite number"),
        (["--batch-size", "1.5"], "--batch-size: expected a whole number"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--lr-schedule", "step"], "--lr-schedule: 'step' is not one of constant, cosine, linear"),
        (["--val-split", "0.9"], "--val-split: must be at most 0.5"),
        (["--val-split", "0"], "--val-split: must be greater than 0"),
        (["--max-shard-size", "5 GB"], "--max-shard-size: '5 GB' is not of the form"),
        (["--text-field", "a b"], "--text-field: 'a b' is not of the form"),
        (["--master-port", "70000"], "--master-port: must be at most 65535"),
    ],
)
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_arguments(PATHS + argv)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"lerning_rate": 0.1}, "lerning_rate: unknown field"),
        ({"batch_size": "8"}, "batch_size: expected a whole number, got string '8'"),
        ({"batch_size": True}, "batch_size: expected a whole number, got boolean True"),
        ({"learning_rate": None}, "learning_rate: must not be null"),
        (
            {"gradient_checkpointing": 1},
            "gradient_checkpointing: expected true or false, got integer 1",
        ),
        ({"precision": "fp16"}, "precision: 'fp16' is not one of auto, fp32, bf16"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_config_files_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as error:
        load_config_file(path)
    assert str(error.value).startswith(f"{path}: "), error.value
    assert message in str(error.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 1,,}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON: .*line 1"):
        load_config_file(broken)


def test_whole_floats_are_accepted_for_whole_fields_and_ints_for_floats():
    assert check_value(FIELDS_BY_NAME["max_steps"], 30.0, where="x") == 30
    assert check_value(FIELDS_BY_NAME["learning_rate"], 1, where="x") == 1.0
    assert parse_text(FIELDS_BY_NAME["gradient_checkpointing"], "yes", where="x") is True


def test_from_mapping_restricted_to_hyperparameters():
    with pytest.raises(ConfigError, match="hp: model: unknown field"):
        from_mapping({"model": "/m"}, source="hp", allowed=HYPERPARAMETERS)
    assert from_mapping({"seed": 3}, source="hp", allowed=HYPERPARAMETERS) == {"seed": 3}


def test_hyperparameters_leave_out_the_paths():
    config = build_config({"model": "/m", "data": "/d", "out": "/o"}, {"seed": 7})
    assert config.hyperparameters()["seed"] == 7
    assert not {"model", "data", "out"} & set(config.hyperparameters())


def test_every_field_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "training.md").read_text()
    missing = [spec.name for spec in FIELDS if f"`{spec.name}`" not in text]
    assert missing == []
