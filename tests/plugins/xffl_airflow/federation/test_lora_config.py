"""``training.peft`` and the adapter strategies in the federation config, and the training
line a LoRA round runs. Starts no process."""

from __future__ import annotations

import pytest
from xffl_airflow.federation.config import ADAPTER_STRATEGIES, ConfigError, parse_config
from xffl_airflow.federation.knobs import RunConfError, check_overridable
from xffl_airflow.federation.layout import RemoteLayout
from xffl_airflow.federation.rounds import training_command

BASE = {
    "campaign": "c",
    "storage": "/s",
    "base_model": "/b",
    "facilities": [{"name": "it", "workdir": "/w", "data": "/d", "python": "/venv/bin/python"}],
}


def config(**extra):
    return parse_config({**BASE, **extra}, source="fed.yaml")


def test_peft_defaults_and_the_training_line():
    parsed = config(
        training={"max_steps": 5, "peft": {"r": 4}}, aggregation={"strategy": "lora-exact"}
    )
    peft = parsed.training.peft
    assert (peft.method, peft.r, peft.alpha, peft.dropout) == ("lora", 4, 16.0, 0.0)
    assert peft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert parsed.training.hyperparameters == {"max_steps": 5}
    line = training_command(parsed, "it", RemoteLayout("c", 2))
    assert (
        "--model /w/c/base --data /d --out /w/c/round-0002/local --adapter /w/c/round-0002/global"
        in line
    )
    assert "lora-train-a" not in line


def test_frozen_a_trains_b_only():
    parsed = config(training={"peft": {}}, aggregation={"strategy": "lora-frozen-a"})
    assert "--no-lora-train-a" in training_command(parsed, "it", RemoteLayout("c", 0))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"training": {"peft": {}}},
            "use one of lora-fedavg, lora-exact, lora-frozen-a, not fedavg",
        ),
        ({"aggregation": {"strategy": "lora-exact"}}, "set training.peft"),
        (
            {"training": {"peft": {}, "lora_r": 4}, "aggregation": {"strategy": "lora-exact"}},
            "lora_r: LoRA is set in training.peft",
        ),
        (
            {"training": {"peft": {"method": "dora"}}, "aggregation": {"strategy": "lora-exact"}},
            "training.peft.method",
        ),
        (
            {"training": {"peft": {"r": 0}}, "aggregation": {"strategy": "lora-exact"}},
            "training.peft.r",
        ),
        (
            {
                "training": {"peft": {"target_modules": ["q proj"]}},
                "aggregation": {"strategy": "lora-exact"},
            },
            "not a module name",
        ),
        (
            {
                "training": {"peft": {}, "command": "{python} x {model} {data} {out}"},
                "aggregation": {"strategy": "lora-exact"},
            },
            "not with a custom command",
        ),
        (
            {
                "training": {"peft": {}},
                "aggregation": {"strategy": "lora-exact", "options": {"momentum": 0.9}},
            },
            "not an option of lora-exact",
        ),
        (
            {
                "training": {"peft": {}},
                "aggregation": {"strategy": "lora-fedavg", "options": {"momentum": 1.5}},
            },
            "momentum",
        ),
    ],
)
def test_bad_peft_settings_name_the_file_and_field(extra, message):
    with pytest.raises(ConfigError, match="fed.yaml") as caught:
        config(**extra)
    assert message in str(caught.value)


def test_the_adapter_strategies_and_options_match_the_engine():
    from xffl_tasks.aggregate.lora_options import ADAPTER_OPTION_SPECS
    from xffl_tasks.aggregate.lora_options import ADAPTER_STRATEGIES as ENGINE

    assert ADAPTER_STRATEGIES == ENGINE == tuple(ADAPTER_OPTION_SPECS)
    parsed = config(
        training={"peft": {}}, aggregation={"strategy": "lora-fedavg", "options": {"momentum": 0.9}}
    )
    assert parsed.aggregation.options == {"momentum": 0.9}


@pytest.mark.parametrize(
    "path", ["training.peft", "training.lora_r", "training.lora_train_a", "training.adapter"]
)
def test_a_run_cannot_open_peft_settings(path):
    with pytest.raises((RunConfError, ValueError), match="not|unknown"):
        check_overridable([path])
