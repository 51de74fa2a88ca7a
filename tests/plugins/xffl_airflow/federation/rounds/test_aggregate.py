"""The aggregation step, offline: who delivered is read from the round's storage under the sealed
plan (never from XCom), the plan's strategy and quorum hold, and every missing facility is named
with its reason. Transfers are local copies; starts no process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.rounds.aggregate import aggregate_step, missing_reason
from xffl_airflow.federation.rounds.store import aggregate_result, write_step
from xffl_airflow.federation.rounds.transfers import pull_step, push_step, record_failure

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    fake_transfers,
    model_folder,
    prepare,
    write_config,
)


@pytest.fixture
def round_at(tmp_path, monkeypatch):
    """A round whose facilities trained ``w`` = 1 (f1, 8 samples) and 3 (f2, 24 samples)."""

    def make(**config):
        sealed = prepare(monkeypatch, write_config(tmp_path, **config))
        trained = {
            "f1": model_folder(tmp_path / "t1", {"w": torch.full((4,), 1.0)}, {"num_samples": 8}),
            "f2": model_folder(tmp_path / "t2", {"w": torch.full((4,), 3.0)}, {"num_samples": 24}),
        }
        fake_transfers(monkeypatch, trained)
        return sealed

    return make


def deliver(sealed, *names):
    for name in names:
        push_step(sealed, name)
        write_step(sealed, name, "train", {"job_id": "1", "state": "COMPLETED"})
        pull_step(sealed, name)


def test_the_facilities_that_delivered_under_the_plan_are_averaged_by_samples(round_at):
    sealed = round_at()
    deliver(sealed, "f1", "f2")
    result = aggregate_step(sealed)
    assert result["participants"] == ["f1", "f2"] and result["missing"] == {}
    weights = load_file(sealed.layout.global_model(0) / "model.safetensors")["w"]
    assert torch.equal(weights, torch.full((4,), 2.5))  # (8 * 1 + 24 * 3) / 32
    assert aggregate_result(sealed)["participants"] == ["f1", "f2"]


def test_below_the_quorum_the_round_is_refused_naming_each_missing_facility_and_why(round_at):
    sealed = round_at()
    deliver(sealed, "f1")
    record_failure(sealed, "f2", "f2.train", 3, RuntimeError("job 17 ended FAILED"), refused=False)
    with pytest.raises(RoundError, match=r"1 of 2 facilities delivered a model, quorum is 2; missing: "
                                         r"f2: f2.train failed after 3 attempt\(s\): job 17 ended FAILED"):
        aggregate_step(sealed)
    assert not sealed.layout.global_model(0).exists()


def test_with_a_quorum_of_one_the_missing_facility_is_left_out_and_named(round_at):
    sealed = round_at(quorum=1)
    deliver(sealed, "f1")
    result = aggregate_step(sealed)
    assert result["participants"] == ["f1"]
    assert result["missing"] == {"f2": "its pull has not succeeded in this round"}
    weights = load_file(sealed.layout.global_model(0) / "model.safetensors")["w"]
    assert torch.equal(weights, torch.ones(4))


def test_a_pull_made_under_an_earlier_plan_of_the_round_does_not_count(round_at, tmp_path, monkeypatch):
    sealed = round_at(quorum=1)
    deliver(sealed, "f1", "f2")
    # prepare runs again with another plan (the quorum changed): f2's steps are not redone
    resealed = prepare(monkeypatch, write_config(tmp_path, quorum=1, aggregation={"strategy": "fedavg", "max_weight_share": 1.0}))
    assert resealed.sha256 != sealed.sha256
    deliver(resealed, "f1")
    result = aggregate_step(resealed)
    assert result["participants"] == ["f1"]
    assert "its pull ran under another plan of this round" in missing_reason(resealed, "f2")
    assert "clear its tasks" in result["missing"]["f2"]


def test_the_plans_bounds_reach_the_aggregation(tmp_path, monkeypatch):
    config = write_config(tmp_path, quorum=1, aggregation={"strategy": "fedavg", "update_norm_bound": {"k": 2, "action": "refuse"}})
    data = __import__("yaml").safe_load(config.read_text())
    data["facilities"][1]["max_samples"] = 10
    config.write_text(__import__("yaml").safe_dump(data))
    sealed = prepare(monkeypatch, config)
    assert (sealed.plan.norm_bound, sealed.plan.norm_bound_action) == (2.0, "refuse")
    assert sealed.plan.facility("f2").max_samples == 10
    fake_transfers(monkeypatch, {
        "f1": model_folder(tmp_path / "t1", {"w": torch.full((4,), 1.0)}, {"num_samples": 8}),
        "f2": model_folder(tmp_path / "t2", {"w": torch.full((4,), 3.0)}, {"num_samples": 24}),  # claims 24 > 10
    })  # fmt: skip
    deliver(sealed, "f1")
    push_step(sealed, "f2")
    write_step(sealed, "f2", "train", {"job_id": "2"})
    from xffl_airflow.federation.errors import FacilityRefused

    with pytest.raises(FacilityRefused, match="client 'f2': metrics.json num_samples 24 exceeds the facility's declared bound of 10"):
        pull_step(sealed, "f2")
    result = aggregate_step(sealed)
    assert result["participants"] == ["f1"]
