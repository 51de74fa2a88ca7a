"""The round's transfers obey the sealed plan: the push checks what it sent against the plan, the
pull runs only after a training under the same plan and refuses hostile outputs at once (the
refusal reads as a rejection). Transfers are local copies; starts no process."""

from __future__ import annotations

import json

import pytest
import torch
from xffl_airflow.federation.errors import FacilityRefused, PlanError, RoundError
from xffl_airflow.federation.rounds.aggregate import missing_reason
from xffl_airflow.federation.rounds.store import step_result, write_step
from xffl_airflow.federation.rounds.transfers import pull_step, push_step, record_failure

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    fake_transfers,
    model_folder,
    prepare,
    write_config,
)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    sealed = prepare(monkeypatch, write_config(tmp_path))
    trained = model_folder(tmp_path / "trained", {"w": torch.ones(4)})
    calls = fake_transfers(monkeypatch, {"f1": trained, "f2": trained})
    return sealed, trained, calls


def test_the_push_sends_the_plans_input_model_to_the_plans_folder_and_records_it(setup):
    sealed, _, calls = setup
    result = push_step(sealed, "f1")
    assert calls["push"] == [("f1", str(sealed.layout.pushed_model(0)), "xffl_offline/offline/round-0000/global")]
    assert result["files"] == dict(sealed.plan.input_model_sha256)
    assert step_result(sealed, "f1", "push") == result


def test_a_push_that_sends_other_files_than_the_plan_sealed_is_refused(setup):
    sealed, _, _ = setup
    (sealed.layout.pushed_model(0) / "extra.txt").write_text("added after prepare")
    with pytest.raises(RoundError, match="the input model sent differs from the one the plan sealed .extra.txt."):
        push_step(sealed, "f1")
    assert step_result(sealed, "f1", "push") is None


def test_the_pull_runs_only_after_a_training_under_the_same_plan(setup):
    sealed, trained, _ = setup
    (trained / "metrics.json").write_text('{"num_samples": 8}')
    with pytest.raises(PlanError, match="f1 cannot be pulled: its train has not succeeded in this round"):
        pull_step(sealed, "f1")
    write_step(sealed, "f1", "train", {"job_id": "1"})
    assert pull_step(sealed, "f1")["metrics"] == {"num_samples": 8}


def test_valid_outputs_travel_on_as_checked_metrics_only(setup):
    sealed, trained, _ = setup
    write_step(sealed, "f1", "train", {"job_id": "1"})
    (trained / "metrics.json").write_text(json.dumps({"num_samples": 8, "val_loss_before": 2, "junk": "x" * 999}))
    result = pull_step(sealed, "f1")
    assert result["metrics"] == {"num_samples": 8, "val_loss_before": 2.0}
    assert step_result(sealed, "f1", "pull")["metrics"] == result["metrics"]


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ('{"num_samples": 8, "val_loss_before": "abc"}', "metrics.json val_loss_before 'abc' is not a number"),
        ('{"num_samples": 1' + "0" * 300 + "}", "metrics.json num_samples 1000"),
        ('{"num_samples": 8, "x": ' + "[" * 200 + "]" * 200 + "}", "metrics.json nests deeper than 4 levels"),
        ('{"num_samples": 8, "device": "' + "x" * 70000 + '"}', "metrics.json is larger than 65536 bytes"),
    ],
)
def test_hostile_metrics_fail_the_pull_at_once_and_the_folder_is_set_aside(setup, metrics, message):
    sealed, trained, _ = setup
    write_step(sealed, "f1", "train", {"job_id": "1"})
    (trained / "metrics.json").write_text(metrics)
    with pytest.raises(FacilityRefused) as raised:
        pull_step(sealed, "f1")
    assert str(raised.value).startswith(f"outputs refused: client 'f1': {message}")
    target = sealed.layout.client_dir(0, "f1")
    assert not target.exists() and target.with_name("f1.rejected").is_dir()
    assert step_result(sealed, "f1", "pull") is None
    record_failure(sealed, "f1", "f1.pull", 1, raised.value, refused=True)
    assert missing_reason(sealed, "f1").startswith(f"rejected: outputs refused: client 'f1': {message}")


def test_a_model_of_another_shape_fails_the_pull(setup):
    sealed, trained, _ = setup
    write_step(sealed, "f1", "train", {"job_id": "1"})
    model_folder(trained, {"w": torch.ones(5)}, {"num_samples": 8})
    with pytest.raises(FacilityRefused, match=r"client 'f1': tensor 'w' has shape \[5\]"):
        pull_step(sealed, "f1")
