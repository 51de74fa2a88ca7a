"""The finalize step, offline: the manifest records what the steps did under the sealed plan (its
sha256 included) and the plan's convergence rules decide, whatever the config file says by then;
the next round's run id and conf come from the manifest and the plan. Starts no process."""

from __future__ import annotations

import pytest
import torch
import yaml
from xffl_airflow.federation.errors import PlanError, RoundError
from xffl_airflow.federation.rounds.aggregate import aggregate_step
from xffl_airflow.federation.rounds.finalize import finalize_step, next_round, round_manifest
from xffl_airflow.federation.rounds.store import write_step
from xffl_airflow.federation.rounds.transfers import pull_step, push_step

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    dag_of,
    fake_transfers,
    model_folder,
    prepare,
    write_config,
)
from xffl_tasks.manifest import sha256_file, verify_campaign


@pytest.fixture
def finished_steps(tmp_path, monkeypatch):
    """Round ``n`` of a campaign with every step done up to the aggregation."""
    config = write_config(tmp_path, convergence={"max_rounds": 3}, overridable=["convergence.max_rounds"])
    fake_transfers(monkeypatch, {
        "f1": model_folder(tmp_path / "t1", {"w": torch.full((4,), 1.0)}, {"num_samples": 8, "val_loss_before": 4.0}),
        "f2": model_folder(tmp_path / "t2", {"w": torch.full((4,), 3.0)}, {"num_samples": 24, "val_loss_before": 2.0}),
    })  # fmt: skip

    def run(round_number=0, **conf):
        sealed = prepare(monkeypatch, config, round_number=round_number, **conf)
        for name in ("f1", "f2"):
            push_step(sealed, name)
            write_step(sealed, name, "train", {"job_id": str(10 + round_number), "state": "COMPLETED"})
            pull_step(sealed, name)
        aggregate_step(sealed)
        return sealed

    return config, run


def test_the_manifest_records_the_plan_and_what_each_step_did_under_it(finished_steps):
    config, run = finished_steps
    sealed = run()
    decision = finalize_step(sealed, run="manual__0")
    manifest = round_manifest(sealed)
    assert manifest["plan"] == {"file": "round-0000/plan.json", "sha256": sealed.sha256, "sealed_at": sealed.plan.sealed_at}
    assert sha256_file(sealed.path) == sealed.sha256
    assert manifest["dag_id"] == "xffl_offline" and manifest["federation"]["dag_id"] == "xffl_offline"
    assert manifest["config_sha256"] == sealed.plan.config_sha256
    assert manifest["facilities"]["f1"]["job"] == {"job_id": "10", "state": "COMPLETED"}
    assert manifest["inputs"]["model_files"] == dict(sealed.plan.input_model_sha256)
    assert manifest["weighted_val_loss"] == pytest.approx((8 * 4.0 + 24 * 2.0) / 32)
    assert decision["stop"] is False and decision["next_run_id"] == "xffl__offline__round-0001"
    assert verify_campaign(sealed.layout.campaign_dir) == []


def test_a_config_edited_after_prepare_changes_nothing_of_the_round(finished_steps):
    config, run = finished_steps
    sealed = run()
    edited = yaml.safe_load(config.read_text())
    edited["convergence"]["max_rounds"] = 1  # would stop the campaign now
    edited["facilities"][0]["preamble"] = ["touch /tmp/never"]
    config.write_text(yaml.safe_dump(edited))
    decision = finalize_step(sealed, run="manual__0")
    assert decision["stop"] is False  # the plan's max_rounds (3) decided
    manifest = round_manifest(sealed)
    assert manifest["config_sha256"] == sealed.plan.config_sha256
    assert manifest["plan"]["sha256"] == sealed.sha256


def test_the_next_round_comes_from_the_manifest_and_keeps_the_runs_knobs(finished_steps):
    _, run = finished_steps
    sealed = run(max_rounds=2)
    finalize_step(sealed, run="manual__0")
    request = next_round(sealed)
    assert request["run_id"] == "xffl__offline__round-0001"
    assert request["conf"] == {"campaign": "offline", "round": 1, "max_rounds": 2}
    assert request["note"].startswith("Campaign **offline**, round 1 (at most 2); continues `manual__0`")
    last = run(1, max_rounds=2)
    assert finalize_step(last, run=request["run_id"])["stop"] is True
    assert next_round(last) is None


def test_finalize_needs_the_aggregation_done_under_the_same_plan(finished_steps, tmp_path, monkeypatch):
    config, run = finished_steps
    sealed = run()
    resealed = prepare(monkeypatch, config, max_rounds=2)  # prepare again, another plan
    with pytest.raises(PlanError, match="the aggregation has not succeeded under this plan"):
        finalize_step(resealed, run="manual__0")
    with pytest.raises(RoundError, match="no manifest written under this round's plan"):
        next_round(sealed)


def test_the_plan_is_found_only_for_its_own_dag_campaign_and_round(finished_steps, tmp_path):
    from xffl_airflow.federation.names import FederationDag
    from xffl_airflow.federation.rounds.store import load_plan

    config, run = finished_steps
    sealed = run()
    dag = dag_of(config)
    assert load_plan(dag, "offline", 0).sha256 == sealed.sha256
    with pytest.raises(PlanError, match="no sealed plan"):
        load_plan(dag, "offline", 1)
    other = FederationDag("xffl_other", "other", dag.storage, "/x.yaml")
    (dag.storage / "other" / "round-0000").mkdir(parents=True)
    (dag.storage / "other" / "round-0000" / "plan.json").write_bytes(sealed.path.read_bytes())
    with pytest.raises(PlanError, match="the plan is for DAG xffl_offline, campaign offline"):
        load_plan(other, "other", 0)
