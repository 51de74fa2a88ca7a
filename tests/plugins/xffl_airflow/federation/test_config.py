"""The federation config: validated on load, errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from xffl_airflow.federation.config import (
    STRATEGIES,
    ConfigError,
    config_sha256,
    load_config,
    merge,
    parse_config,
)

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
        ({"training": {"command": "{python} {nope}"}}, "unknown placeholder(s) ['nope']"),
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
