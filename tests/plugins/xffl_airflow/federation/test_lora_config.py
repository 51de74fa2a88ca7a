"""``training.peft`` and the adapter strategies in the federation config, and the training
line a LoRA round runs. Starts no process."""

from __future__ import annotations

import pytest
from xffl_airflow.federation.config import ConfigError, parse_config
from xffl_airflow.federation.config_sections import ADAPTER_STRATEGIES
from xffl_airflow.federation.errors import RunConfError
from xffl_airflow.federation.knobs import check_overridable
from xffl_airflow.federation.layout import RemoteLayout
from xffl_airflow.federation.rounds.plan import training_command

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
        training={"max_steps": 5, "peft": {"r": 4}}, aggregation={"strategy": "lora-svd"}
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
            "use one of lora-fedavg, lora-svd, lora-frozen-a, lora-stacked, not fedavg",
        ),
        ({"aggregation": {"strategy": "lora-svd"}}, "set training.peft"),
        (
            {"training": {"peft": {}, "lora_r": 4}, "aggregation": {"strategy": "lora-svd"}},
            "lora_r: LoRA is set in training.peft",
        ),
        (
            {"training": {"peft": {"method": "dora"}}, "aggregation": {"strategy": "lora-svd"}},
            "training.peft.method",
        ),
        (
            {"training": {"peft": {"r": 0}}, "aggregation": {"strategy": "lora-svd"}},
            "training.peft.r",
        ),
        (
            {
                "training": {"peft": {"target_modules": ["q proj"]}},
                "aggregation": {"strategy": "lora-svd"},
            },
            "not a module name",
        ),
        (
            {
                "training": {"peft": {}, "command": "{python} x {model} {data} {out}"},
                "aggregation": {"strategy": "lora-svd"},
            },
            "not with a custom command",
        ),
        (
            {
                "training": {"peft": {}},
                "aggregation": {"strategy": "lora-svd", "options": {"momentum": 0.9}},
            },
            "not an option of lora-svd",
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


def test_the_old_name_lora_exact_is_refused_pointing_to_both():
    with pytest.raises(ConfigError) as caught:
        config(training={"peft": {}}, aggregation={"strategy": "lora-exact"})
    assert ("aggregation.strategy: lora-exact was renamed lora-svd (the best rank-r approximation, not exact); "
            "for exact aggregation use lora-stacked") in str(caught.value)


TWO = [{"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data", "peft": {"r": 4}},
       {"name": "czechia", "workdir": "/home/b/xffl", "data": "/home/b/data", "peft": {"r": 16, "alpha": 32}}]


def test_facilities_may_train_their_own_ranks_under_lora_stacked_only():
    parsed = config(facilities=TWO, training={"peft": {"alpha": 8}}, aggregation={"strategy": "lora-stacked"})
    assert (parsed.lora_rank("italy"), parsed.lora_rank("czechia")) == ((4, 8.0), (16, 32.0))
    with pytest.raises(ConfigError) as caught:
        config(facilities=TWO, training={"peft": {}}, aggregation={"strategy": "lora-svd"})
    assert ("lora-svd cannot mix LoRA ranks or alphas: facilities italy (r=4, alpha=16), czechia (r=16, alpha=32)"
            in str(caught.value))
    with pytest.raises(ConfigError, match="facilities: italy, czechia set peft, but training.peft is not set"):
        config(facilities=TWO)


def test_lora_stacked_offers_no_update_norm_bound():
    with pytest.raises(ConfigError, match="update_norm_bound: not offered by lora-stacked"):
        config(training={"peft": {}}, aggregation={"strategy": "lora-stacked", "update_norm_bound": {"k": 3}})
