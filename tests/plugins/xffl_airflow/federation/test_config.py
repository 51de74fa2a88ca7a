"""The federation config: validated on load, errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from xffl_airflow.federation.config import (
    ConfigError,
    config_sha256,
    load_config,
    merge,
    parse_config,
)
from xffl_airflow.federation.config_sections import STRATEGIES

EXAMPLES = Path(__file__).resolve().parents[4] / "plugins" / "xffl_airflow" / "federation" / "examples"
BASE = {
    "campaign": "demo",
    "storage": "/srv/xffl",
    "base_model": "/srv/models/tiny",
    "facilities": [
        {"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data"},
        {"name": "czechia", "conn_id": "hpc_cz", "workdir": "/home/b/xffl", "data": "/home/b/data"},
    ],
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_connection_ids():
    config = parse_config(BASE)
    assert [f.connection_id for f in config.facilities] == ["facility_italy", "hpc_cz"]
    assert config.required_facilities == 2
    assert (config.aggregation.strategy, config.convergence.max_rounds) == ("fedavg", 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"facilities": [{"name": "x; touch /tmp/pwned", "workdir": "/w", "data": "/d"}]}, "facilities[0].name: a facility name is"),
        ({"facilities": [{"name": "Italy", "workdir": "/w", "data": "/d"}]}, "facilities[0].name"),
        ({"aggregation": {"strategy": "fedmagic"}}, "aggregation.strategy: unknown strategy 'fedmagic'"),
        ({"campaign": "Demo Run"}, "campaign: a campaign name is"),
        ({"quorum": 3}, "quorum: 3 is more than the 2 facilities"),
        ({"facilities": [{"name": "a", "workdir": "rel/dir", "data": "/d"}]}, "facilities[0].workdir: must be an absolute path"),
        ({"facilities": [{"name": "a", "workdir": "/w/../etc", "data": "/d"}]}, "facilities[0].workdir: must not contain '..'"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "python": "python; rm -rf /"}]}, "facilities[0].python"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "colour": "red"}]}, "facilities[0].colour: unknown field"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d"}, {"name": "a", "workdir": "/v", "data": "/e"}]}, "repeated name(s) ['a']"),
        ({"facilities": []}, "facilities: List should have at least 1 item"),
        ({"convergence": {"max_rounds": 0}}, "convergence.max_rounds"),
        ({"training": {"command": "{python} {nope}"}}, "placeholder '{nope}' is not one of"),
        ({"training": {"command": "{python.__class__} {out}"}}, "placeholder '{python.__class__}' is not one of"),
        ({"training": {"command": "{python!r} {out}"}}, "placeholder '{python!r}' is not one of"),
        ({"training": {"command": "{python} {out"}}, "training: command: not a valid template"),
        ({"facilities": [{"name": "a", "workdir": "/w/$(id)", "data": "/d"}]}, "facilities[0].workdir: holds '$', '(', ')'"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d/x y\u2028z"}]}, "facilities[0].data: holds"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "weight": float("inf")}]}, "facilities[0].weight"),
        ({"aggregation": {"strategy": "fedavgm", "options": {"server_learning_rate": float("inf")}}},
         "aggregation.options: option 'server_learning_rate' of fedavgm must be in (0, 1000], got inf"),
        ({"aggregation": {"strategy": "fedavgm", "options": {"momentum": 1.5}}}, "option 'momentum' of fedavgm must be in [0, 1)"),
        ({"aggregation": {"options": {"beta1": 0.9}}}, "option 'beta1' is not an option of fedavg"),
        ({"convergence": {"min_improvement": float("nan")}}, "convergence.min_improvement"),
        ({"aggregation": {"max_weight_share": 0.4}}, "aggregation.max_weight_share: 0.4 cannot hold when only 2 facilities"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d"}, {"name": "b", "conn_id": "facility_a", "workdir": "/w", "data": "/e"}]},
         "facilities: a, b share one connection and workdir"),
        ({"overridable": ["training.command"]}, "overridable: [0]: training.command cannot be opened to runs"),
        ({"overridable": ["facilities"]}, "overridable: [0]: facilities cannot be opened to runs"),
        ({"overridable": ["storage", "training.max_steps"]}, "overridable: [0]: storage cannot be opened"),
        ({"overridable": ["training.seed", "training.seed"]}, "training.seed is listed twice"),
        ({"training": {"command": "{python} -m x {out}"}, "overridable": ["training.max_steps"]},
         "overridable: training.max_steps has no effect with training.command set"),
        ({"training": {"learning_rate": [1, 2]}}, "learning_rate: must be a number"),
        ({"storage": "relative"}, "storage: must be an absolute path"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "sbatch": {"partition": "a;b"}}]}, "facilities[0]: sbatch.partition"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "sbatch": {"nodes": 0}}]}, "facilities[0]: sbatch.nodes"),
        ({"facilities": [{"name": "a", "workdir": "/w", "data": "/d", "sbatch": {"extra": ["--output=/tmp/x"]}}]}, "sbatch.extra[0]"),
        ({"training": {"learnig_rate": 0.1}}, "training: learnig_rate: unknown field"),
        ({"training": {"max_steps": "many"}}, "training: max_steps"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {**BASE, **change}))
    assert str(tmp_path / "federation.yaml") in str(caught.value)
    assert message in str(caught.value)


def test_missing_field_and_unreadable_file(tmp_path):
    data = dict(BASE)
    del data["base_model"]
    with pytest.raises(ConfigError, match="base_model: required field is missing"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match="cannot read the federation config"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("campaign: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_environment_references_expand_and_unset_ones_are_named(tmp_path, monkeypatch):
    data = {**BASE, "storage": "${XFFL_TEST_STORAGE}/campaigns"}
    monkeypatch.setenv("XFFL_TEST_STORAGE", "/data")
    assert load_config(write(tmp_path, data)).storage == "/data/campaigns"
    monkeypatch.delenv("XFFL_TEST_STORAGE")
    with pytest.raises(ConfigError, match="storage: environment variable XFFL_TEST_STORAGE is not set"):
        load_config(write(tmp_path, data))


def test_only_xffl_variables_expand_and_no_error_prints_an_expanded_value(tmp_path, monkeypatch):
    secret = '{"conn_type": "ssh", "extra": {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----abc"}}'
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_X", secret)
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, {**BASE, "campaign": "${AIRFLOW_CONN_FACILITY_X}"}))
    assert "campaign: ${AIRFLOW_CONN_FACILITY_X} is not allowed" in str(refused.value)
    assert "PRIVATE KEY" not in str(refused.value) and "conn_type" not in str(refused.value)
    # an allowed variable whose value is invalid: the error names the variable, not its value
    monkeypatch.setenv("XFFL_TEST_CAMPAIGN", "Not A Name: s3cr3t")
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, {**BASE, "campaign": "${XFFL_TEST_CAMPAIGN}"}))
    assert "campaign: a campaign name is" in str(refused.value) and "${XFFL_TEST_CAMPAIGN}" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


def test_a_yaml_error_says_where_without_echoing_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("campaign: demo\nsecret_line: [unclosed, token-abc123\n")
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "bad.yaml")
    assert "not valid YAML" in str(refused.value) and "line " in str(refused.value)
    assert "token-abc123" not in str(refused.value) and "secret_line" not in str(refused.value)


def test_overridable_defaults_and_knob_defaults(tmp_path):
    config = parse_config({**BASE, "training": {"max_steps": 10}})
    assert [k.path for k in config.knobs][:2] == ["training.learning_rate", "training.lr_schedule"]
    defaults = config.knob_defaults()
    assert defaults["max_steps"] == 10 and defaults["max_rounds"] == 3 and defaults["lr_schedule"] == "cosine"
    closed = parse_config({**BASE, "overridable": []})
    assert closed.knobs == [] and closed.knob_defaults() == {}
    with_command = parse_config({**BASE, "training": {"command": "{python} -m x {model} {data} {out}"}})
    assert all(k.section == "convergence" for k in with_command.knobs)


def test_overrides_merge_deeply(tmp_path):
    path = write(tmp_path, {**BASE, "training": {"max_steps": 10, "learning_rate": 0.1}})
    config = load_config(path, {"training": {"max_steps": 3}, "convergence": {"max_rounds": 5}})
    assert config.training.hyperparameters == {"max_steps": 3, "learning_rate": 0.1}
    assert config.convergence.max_rounds == 5
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_config_hash_changes_with_the_config():
    assert config_sha256(parse_config(BASE)) == config_sha256(parse_config(dict(BASE)))
    assert config_sha256(parse_config(BASE)) != config_sha256(parse_config({**BASE, "quorum": 1}))


def test_example_configs_validate(monkeypatch):
    for name in ("XFFL_STORAGE", "XFFL_BASE_MODEL", "XFFL_ITALY_WORKDIR", "XFFL_ITALY_DATA",
                 "XFFL_CZECHIA_WORKDIR", "XFFL_CZECHIA_DATA"):  # fmt: skip
        monkeypatch.setenv(name, f"/x/{name.lower()}")
    monkeypatch.setenv("XFFL_FACILITY_PYTHON", "/opt/venv/bin/python")
    local = load_config(EXAMPLES / "local.yaml")
    assert [f.name for f in local.facilities] == ["italy", "czechia"]
    hpc = load_config(EXAMPLES / "hpc.yaml")
    assert {f.launcher for f in hpc.facilities} == {"srun", "torchrun"}
    assert hpc.required_facilities == 1


def test_strategies_match_the_aggregation_engine():
    from xffl_tasks.aggregate import STRATEGIES as ENGINE

    assert set(STRATEGIES) == set(ENGINE)


def test_a_config_that_bounds_no_facilitys_claim_says_so():
    [warning] = parse_config(BASE).warnings
    assert "no bound on the weight a facility can claim: italy, czechia may report any num_samples" in warning
    bounded = {**BASE, "facilities": [{**f, "max_samples": 1000} for f in BASE["facilities"]]}
    assert parse_config(bounded).warnings == []
    assert parse_config({**BASE, "aggregation": {"max_weight_share": 0.6}}).warnings == []
    half = {**BASE, "facilities": [{**BASE["facilities"][0], "max_samples": 10}, BASE["facilities"][1]]}
    assert "czechia may report" in parse_config(half).warnings[0] and "italy" not in parse_config(half).warnings[0]


@pytest.mark.parametrize("name", ["local.yaml", "local-lora.yaml", "local-dp.yaml", "hpc.yaml"])
def test_the_shipped_examples_bound_every_facilitys_claim(name, monkeypatch):
    for variable in ("STORAGE", "BASE_MODEL", "ITALY_WORKDIR", "ITALY_DATA", "CZECHIA_WORKDIR", "CZECHIA_DATA",
                     "FACILITY_PYTHON"):  # fmt: skip
        monkeypatch.setenv(f"XFFL_{variable}", f"/srv/{variable.lower()}")
    assert load_config(EXAMPLES / name).warnings == []
    assert all(f.max_samples for f in load_config(EXAMPLES / name).facilities)


def test_a_claim_bound_is_a_whole_number_in_range():
    for bad, message in ((0, "greater than or equal to 1"), (10**13, "less than or equal to 1000000000000")):
        with pytest.raises(ConfigError, match=f"facilities\\[0\\].max_samples: Input should be {message}"):
            parse_config({**BASE, "facilities": [{**BASE["facilities"][0], "max_samples": bad}]})
