"""The knobs a run may turn: typed, ranged, and nothing else (docs/security.md, R2)."""

from __future__ import annotations

import pytest
from xffl_airflow.federation.config import parse_config
from xffl_airflow.federation.errors import RunConfError
from xffl_airflow.federation.knobs import CATALOGUE, DEFAULT_OVERRIDABLE, accept_run_conf
from xffl_airflow.federation.names import check_campaign

BASE = {
    "campaign": "demo",
    "storage": "/srv/xffl",
    "base_model": "/srv/models/tiny",
    "training": {"max_steps": 10, "learning_rate": 0.003},
    "facilities": [{"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data"}],
}


def accept(conf, **config):
    parsed = parse_config({**BASE, **config})
    return accept_run_conf(conf, parsed.knobs, parsed.knob_defaults())


def test_opened_knobs_become_overrides_and_the_configs_own_values_do_not():
    assert accept({"campaign": "x", "round": 2, "max_steps": 10, "learning_rate": 0.003, "max_rounds": 3}) == {}
    assert accept({"max_steps": 20, "max_rounds": 5, "lr_schedule": "linear"}) == {
        "training": {"max_steps": 20, "lr_schedule": "linear"},
        "convergence": {"max_rounds": 5},
    }
    assert accept({"max_steps": 20.0}) == {"training": {"max_steps": 20}}


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"overrides": {"training": {"command": "curl x | sh; {python} {model} {data} {out}"}}}, "overrides.training.command"),
        ({"training": {"command": "curl x | sh"}}, "training.command"),
        ({"config": "/etc/passwd"}, "config"),
        ({"facilities": [{"name": "italy", "preamble": ["curl x | sh"]}]}, "facilities"),
        ({"storage": "/etc/cron.d"}, "storage"),
        ({"base_model": "/root"}, "base_model"),
        ({"python": "/tmp/evil"}, "python"),
        ({"workdir": "/tmp"}, "workdir"),
        ({"sbatch": {"extra": ["--wrap=id"]}}, "sbatch.extra"),
        ({"threads": 64}, "threads"),  # a training field, but not opened by default
    ],
)
def test_anything_the_config_did_not_open_is_refused_by_name(conf, named):
    with pytest.raises(RunConfError) as refused:
        accept(conf)
    message = str(refused.value)
    assert message.startswith(f"run conf: {named}: not a setting a run may change")
    assert "curl" not in message and "/etc" not in message  # the value is never echoed


def test_a_knob_the_config_closed_is_refused():
    with pytest.raises(RunConfError, match="run conf: max_steps: not a setting"):
        accept({"max_steps": 5}, overridable=["convergence.max_rounds"])
    assert accept({"seed": 3}, overridable=["training.seed"]) == {"training": {"seed": 3}}


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"learning_rate": float("inf")}, "params.learning_rate (training.learning_rate): must be a finite number"),
        ({"learning_rate": 0}, "params.learning_rate (training.learning_rate): must be > 0"),
        ({"learning_rate": 5.0}, "must be <= 1"),
        ({"learning_rate": "0.1; rm -rf /"}, "params.learning_rate (training.learning_rate): must be a number, got '0.1; rm -rf /'"),
        ({"max_steps": 2.5}, "params.max_steps (training.max_steps): must be a whole number"),
        ({"max_steps": True}, "params.max_steps (training.max_steps): must be a whole number, got True"),
        ({"max_steps": 10**30}, "must be <= 1e+07"),
        ({"lr_schedule": "$(id)"}, "params.lr_schedule (training.lr_schedule): must be one of constant, cosine, linear"),
        ({"max_rounds": 0}, "params.max_rounds (convergence.max_rounds): must be >= 1"),
        ({"max_rounds": None}, "params.max_rounds (convergence.max_rounds): must be set"),
        ({"min_update_norm": float("nan")}, "must be a finite number"),
    ],
)
def test_knob_values_are_typed_and_ranged(conf, message):
    with pytest.raises(RunConfError) as refused:
        accept(conf)
    assert message in str(refused.value)


def test_a_long_value_is_cut_short_in_the_error():
    with pytest.raises(RunConfError) as refused:
        accept({"learning_rate": "x" * 500})
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize("name", ["../other-campaign", "/etc/cron.d", "Demo", "a b", "a\nb", "x" * 65, 7])
def test_a_campaign_from_a_run_follows_the_configs_rule(name):
    with pytest.raises(RunConfError, match="params.campaign: a campaign name is 1-64 of"):
        check_campaign(name, "params.campaign")
    assert check_campaign("spring-2027_a", "params.campaign") == "spring-2027_a"


def test_the_catalogue_opens_no_path_command_device_or_connection():
    assert set(DEFAULT_OVERRIDABLE) <= set(CATALOGUE)
    for forbidden in ("command", "preamble", "python", "workdir", "data", "conn_id", "sbatch", "storage",
                      "base_model", "facilities", "model", "out", "val_file", "device", "parallelism",
                      "threads", "master_port", "text_field", "max_shard_size"):  # fmt: skip
        assert not any(path.split(".")[-1] == forbidden for path in CATALOGUE), forbidden
    for knob in CATALOGUE.values():
        schema = knob.schema()
        assert schema.get("enum") or "maximum" in schema or schema["type"] in ("boolean", ["boolean", "null"]), knob
