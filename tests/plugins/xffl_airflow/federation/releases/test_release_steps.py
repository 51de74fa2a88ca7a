"""A campaign's release run, offline: prepare_release seals what it must do from the campaign's
chain and the last round's plan; the evaluations the facilities send back choose the best round;
it is released when it beats the last release by the margin, and only with the approval the
plan asks for. Transfers are local copies; starts no process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.releases import evaluate, prepare, publish, select
from xffl_airflow.federation.releases.store import write_step
from xffl_airflow.federation.rounds.aggregate import aggregate_step
from xffl_airflow.federation.rounds.finalize import finalize_step
from xffl_airflow.federation.rounds.store import write_step as write_round_step
from xffl_airflow.federation.rounds.transfers import pull_step, push_step

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    FakeReport,
    dag_of,
    fake_transfers,
    model_folder,
    write_config,
)
from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    prepare as prepare_round,
)
from xffl_tasks.release.verify import verify_release


def run_campaign(monkeypatch, config: Path, tmp_path: Path, campaign: str, losses: list[float]) -> None:
    """A finished campaign of len(losses) rounds whose facilities report val_loss_before losses[r]."""
    for number, loss in enumerate(losses):
        trained = {name: model_folder(tmp_path / f"{campaign}-{name}-{number}", {"w": torch.full((4,), float(number))},
                                      {"num_samples": 8, "val_loss_before": loss}) for name in ("f1", "f2")}  # fmt: skip
        fake_transfers(monkeypatch, trained)
        sealed = prepare_round(monkeypatch, config, round_number=number, campaign=campaign)
        for name in ("f1", "f2"):
            push_step(sealed, name)
            write_round_step(sealed, name, "train", {"job_id": str(number)})
            pull_step(sealed, name)
        aggregate_step(sealed)
        finalize_step(sealed, run=f"manual__{number}")


def fake_evaluations(monkeypatch, losses: dict[str, dict[str, float]]):
    """``pull`` writes each facility an evaluation.json of the given candidates' losses (the
    last release's alone in ``evaluation-release``, as a LoRA campaign's second invocation)."""
    import xffl_airflow.transfer as transfer
    from xffl_airflow.federation.rounds.prepare import view_hashes

    def push(local, remote, remote_dir, **tuning):
        return FakeReport(view_hashes(Path(local)))

    def pull(remote, remote_dir, local, **tuning):
        alone = remote_dir.endswith("evaluation-release")
        chosen = {k: v for k, v in losses[remote.name].items() if k == "release" or not alone}
        Path(local).mkdir(parents=True, exist_ok=True)
        (Path(local) / "evaluation.json").write_text(json.dumps({
            "format": "xffl-evaluation", "version": 1, "seq_len": 64, "seed": 0,
            "candidates": {k: {"val_loss": v, "val_tokens": 100, "val_sequences": 4} for k, v in chosen.items()},
        }))  # fmt: skip
        return FakeReport({"evaluation.json": "0" * 64})

    monkeypatch.setattr(transfer, "push", push)
    monkeypatch.setattr(transfer, "pull", pull)


def release_run(monkeypatch, dag, campaign: str, losses: dict[str, dict[str, float]]):
    sealed = prepare.prepare_release(dag=dag, run_conf={"campaign": campaign}, run="manual__r")
    fake_evaluations(monkeypatch, losses)
    for name in ("f1", "f2"):
        evaluate.push_step(sealed, name)
        write_step(sealed, name, "evaluate", {"job_id": "9"})
        evaluate.pull_step(sealed, name)
    return sealed, select.select_step(sealed)


@pytest.fixture
def federation(tmp_path, monkeypatch):
    config = write_config(tmp_path, convergence={"max_rounds": 3}, release={"min_improvement": 0.5})
    return config, dag_of(config)


def test_the_best_round_is_released_with_its_card_and_a_chain_that_verifies(federation, tmp_path, monkeypatch):
    config, dag = federation
    # global models 0, 1, 2 have losses 4.0 (round 1's val_loss_before), 3.0 (round 2's), 3.5 (final)
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0, 4.0, 3.0])
    sealed, decided = release_run(monkeypatch, dag, "offline", {"f1": {"last": 3.5}, "f2": {"last": 3.5}})
    assert sealed.plan.previous_release is None and sealed.plan.model_kind == "model"
    assert decided["release"] is True and decided["selection"]["round"] == 1
    assert "there is no previous release" in decided["reason"]
    event = publish.publish_step(sealed)
    folder = Path(event["path"])
    assert (event["number"], folder.name) == (1, "1") and folder.parent.parent == tmp_path / "storage" / "_releases"
    assert verify_release(folder) == []
    record = json.loads((folder / "release.json").read_text())
    assert record["source"]["round"] == 1 and record["record"]["approval"] is None
    card = (folder / "README.md").read_text()
    assert "offline" in card and "round 1" in card.lower()


def test_a_campaign_that_does_not_beat_the_release_by_the_margin_releases_nothing(federation, tmp_path, monkeypatch):
    config, dag = federation
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0, 4.0, 3.0])
    sealed, _ = release_run(monkeypatch, dag, "offline", {"f1": {"last": 3.5}, "f2": {"last": 3.5}})
    publish.publish_step(sealed)
    run_campaign(monkeypatch, config, tmp_path, "second", [3.2, 3.1, 2.9])
    sealed, decided = release_run(monkeypatch, dag, "second", {"f1": {"last": 2.8, "release": 3.0},
                                                               "f2": {"last": 2.8, "release": 3.0}})  # fmt: skip
    assert sealed.plan.previous_release.number == 1
    assert decided["release"] is False
    assert "improves on release 1 by 0.200000" in decided["reason"] and "nothing is released" in decided["reason"]
    with pytest.raises(RoundError, match="the decision says nothing is released"):
        publish.publish_step(sealed)
    assert sorted(p.name for p in (tmp_path / "storage" / "_releases" / "offline").iterdir()) == ["1"]


def test_with_approval_asked_nothing_is_published_without_it(tmp_path, monkeypatch):
    config = write_config(tmp_path, convergence={"max_rounds": 2}, release={"approval": True})
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0, 4.0])
    sealed, decided = release_run(monkeypatch, dag_of(config), "offline", {"f1": {"last": 3.0}, "f2": {"last": 3.0}})
    assert decided["release"] is True and "once a person approves it" in decided["reason"]
    with pytest.raises(RoundError, match="asks for a person's approval and none is recorded"):
        publish.publish_step(sealed)
    assert not (tmp_path / "storage" / "_releases").exists()


def test_a_campaign_that_has_not_ended_or_is_another_dags_is_refused(federation, tmp_path, monkeypatch):
    config, dag = federation
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0])  # round 0 of 3: goes on
    with pytest.raises(RoundError, match="its last round \\(0\\) has not ended the campaign"):
        prepare.prepare_release(dag=dag, run_conf={"campaign": "offline"}, run="r")
    other = dag_of(write_config(tmp_path, campaign="other"))
    with pytest.raises(RoundError, match="belongs to DAG xffl_offline, not xffl_other"):
        prepare.prepare_release(dag=other, run_conf={"campaign": "offline"}, run="r")


def test_the_approval_form_and_the_view_show_the_comparison(federation, tmp_path, monkeypatch):
    from xffl_airflow.federation.releases.approval import approval_text
    from xffl_airflow.ui.releases_view import federation_releases, release_block

    from xffl_tasks.release.chain import read_campaign

    config, dag = federation
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0, 4.0, 3.0])
    sealed, _ = release_run(monkeypatch, dag, "offline", {"f1": {"last": 3.5}, "f2": {"last": 3.5}})
    publish.publish_step(sealed)
    run_campaign(monkeypatch, config, tmp_path, "second", [2.9, 2.0, 1.9])
    sealed, decided = release_run(monkeypatch, dag, "second", {"f1": {"last": 1.5, "release": 3.1},
                                                               "f2": {"last": 1.7, "release": 2.9}})  # fmt: skip
    assert decided["release"] is True and decided["selection"]["round"] == 2
    chain = read_campaign(sealed.layout.folder.parent)
    subject, body = approval_text(sealed.plan, decided, chain.manifests)
    assert subject == "Release campaign second, round 2's model?"
    assert "| f1 | 1.5000 | 3.1000 |" in body and "| f2 | 1.7000 | 2.9000 |" in body
    assert "Against release 1: improves on release 1 by 1.400000" in body
    releases = federation_releases(tmp_path / "storage" / "_releases", "offline")
    assert [(r["number"], r["campaign"], r["round"]) for r in releases] == [(1, "offline", 1)]
    html = release_block("second", decided, releases)
    assert '<span id="best-round">2</span>' in html and "to be released" in html and 'data-release="1"' in html
    rejected = {"plan_sha256": decided["plan_sha256"], "approved": False, "responded_by": {"name": "reviewer"}}
    assert "not released (rejected by reviewer)" in release_block("second", decided, releases, approval=rejected)
    stale = {**rejected, "plan_sha256": "0" * 64}  # an answer under another plan is not this one's
    assert "to be released" in release_block("second", decided, releases, approval=stale)


@pytest.mark.parametrize(
    ("event", "approved"),
    [({"chosen_options": ["Approve"]}, True), ({"chosen_options": ["Reject"]}, False),
     ({"error": "timed out", "error_type": "timeout"}, False)],
)  # fmt: skip
def test_the_answer_is_recorded_before_the_approval_task_skips_or_fails(tmp_path, monkeypatch, event, approved):
    from datetime import datetime, timezone

    from xffl_airflow.federation.releases.approval import ReleaseApprovalOperator

    config = write_config(tmp_path, convergence={"max_rounds": 2}, release={"approval": True})
    run_campaign(monkeypatch, config, tmp_path, "offline", [5.0, 4.0])
    sealed, decided = release_run(monkeypatch, dag_of(config), "offline", {"f1": {"last": 3.0}, "f2": {"last": 3.0}})
    operator = ReleaseApprovalOperator(task_id="approve", federation=dag_of(config))
    monkeypatch.setattr(operator, "_sealed", lambda context: (sealed, decided))
    answer = {"params_input": {}, "responded_at": datetime(2026, 1, 2, tzinfo=timezone.utc),
              "responded_by_user": {"id": "u1", "name": "reviewer"}, **event}  # fmt: skip
    if approved or "error" not in event:
        operator.execute_complete({}, answer)
    else:
        with pytest.raises(Exception, match="timed out|timeout"):
            operator.execute_complete({}, answer)
    record = json.loads((sealed.layout.folder / "approval.json").read_text())
    assert record["approved"] is approved and record["plan_sha256"] == sealed.sha256
    if approved:
        assert publish.publish_step(sealed)["number"] == 1
    else:
        with pytest.raises(RoundError, match="asks for a person's approval and none is recorded"):
            publish.publish_step(sealed)
