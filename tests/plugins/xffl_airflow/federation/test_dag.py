"""The federation DAG's wiring: which steps retry, and which failures are refused at once."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException
from xffl_airflow.federation.config import ConfigError
from xffl_airflow.federation.dag import LOCAL_RETRIES, _refusals_fail_at_once, build_federation_dag
from xffl_airflow.federation.rounds import ConnectionsUnavailable, RoundError

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


@pytest.fixture
def dag(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return build_federation_dag(str(path))


def test_remote_steps_retry_as_configured_and_local_steps_retry_transient_failures(dag):
    for facility in ("italy", "czechia"):
        for step in ("push", "train", "pull"):
            task = dag.task_dict[f"{facility}.{step}"]
            assert (task.retries, task.retry_delay) == (5, timedelta(seconds=7)), task.task_id
    for task_id in ("prepare", "aggregate", "finalize", "continue_campaign"):
        task = dag.task_dict[task_id]
        assert (task.retries, task.retry_delay) == (LOCAL_RETRIES["retries"], LOCAL_RETRIES["retry_delay"]), task_id
    assert dag.task_dict["aggregate"].trigger_rule == "all_done"
    assert dag.task_dict["italy.train"].upstream_task_ids == {"italy.push"}
    assert dag.task_dict["aggregate"].upstream_task_ids == {"italy.pull", "czechia.pull"}


@pytest.mark.parametrize("refusal", [ConfigError("training.lr: must be > 0"), RoundError("quorum is 2")])
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
