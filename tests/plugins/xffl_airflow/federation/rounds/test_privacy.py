"""A round's differential privacy, offline: the pull sets aside a facility that did not run the
DP-SGD the plan asked for; finalize records the ledger (the accountant's epsilon for the
reported parameters, checked by verify) and stops the campaign when too few facilities could
train within their budgets; prepare refuses a warm-started campaign whose lineage spent them."""

from __future__ import annotations

import json

import pytest
import torch
from xffl_airflow.federation.errors import FacilityRefused, RoundError
from xffl_airflow.federation.rounds.aggregate import aggregate_step
from xffl_airflow.federation.rounds.finalize import finalize_step, round_manifest
from xffl_airflow.federation.rounds.store import write_step
from xffl_airflow.federation.rounds.transfers import pull_step, push_step

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    fake_transfers,
    model_folder,
    prepare,
    write_config,
)
from xffl_tasks.manifest import verify_campaign
from xffl_tasks.privacy.accountant import DpRound, epsilon

DP = {"mode": "dp-sgd", "sample_rate": 0.01, "steps": 50, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
      "delta": 1e-5, "accountant": "rdp", "poisson": True, "num_train_sequences": 10000, "world_size": 1}  # fmt: skip


def dp_round(monkeypatch, tmp_path, config, number, privacy=DP, **conf):
    trained = {name: model_folder(tmp_path / f"t-{name}-{number}", {"w": torch.full((4,), float(number))},
                                  {"num_samples": 8, "val_loss_before": 3.0 - number, "privacy": privacy})
               for name in ("f1", "f2")}  # fmt: skip
    fake_transfers(monkeypatch, trained)
    sealed = prepare(monkeypatch, config, round_number=number, **conf)
    for name in sealed.plan.facility_names:
        if sealed.plan.facility(name).excluded:
            continue
        push_step(sealed, name)
        write_step(sealed, name, "train", {"job_id": str(number)})
        pull_step(sealed, name)
    aggregate_step(sealed)
    return sealed, finalize_step(sealed, run=f"manual__{number}")


def config_with(tmp_path, budget, **extra):
    return write_config(tmp_path, convergence={"max_rounds": 3},
                        privacy={"noise_multiplier": 1.1, "max_grad_norm": 1.0, "epsilon_budget": budget}, **extra)  # fmt: skip


def test_the_ledger_holds_the_accountants_epsilon_and_verify_checks_it(tmp_path, monkeypatch):
    config = config_with(tmp_path, 100.0)
    sealed, decision = dp_round(monkeypatch, tmp_path, config, 0)
    _, decision = dp_round(monkeypatch, tmp_path, config, 1)
    ledger = round_manifest(sealed)["privacy"]  # round 0's
    one = DpRound(0.01, 1.1, 50)
    assert ledger["facilities"]["f1"]["epsilon"] == pytest.approx(epsilon([one], delta=1e-5), rel=1e-12)
    second = json.loads((sealed.layout.manifest(1)).read_text())["privacy"]["facilities"]["f2"]
    assert second["epsilon"] == pytest.approx(epsilon([one, one], delta=1e-5), rel=1e-12)
    assert [h["round"] for h in second["history"]] == [0, 1] and second["budget_left"] is True
    assert verify_campaign(sealed.layout.campaign_dir) == []
    from xffl_airflow.ui.campaign_view import render_page
    from xffl_airflow.ui.campaigns import read_manifests

    shown = f"{second['epsilon']:.3f}"
    assert shown in (sealed.layout.campaign_dir / "report.txt").read_text()
    page = render_page(dag_id="xffl_offline", campaign="offline", manifests=read_manifests(sealed.layout.campaign_dir),
                       problems=[])  # fmt: skip
    assert f'<td data-col="epsilon">{shown}</td>' in page
    path = sealed.layout.manifest(1)
    tampered = json.loads(path.read_text())
    tampered["privacy"]["facilities"]["f1"]["epsilon"] = 0.001
    path.write_text(json.dumps(tampered))
    assert any("is not the accountant's" in p for p in verify_campaign(sealed.layout.campaign_dir))


def test_a_budget_two_rounds_exhaust_stops_the_campaign_after_round_1(tmp_path, monkeypatch):
    one = DpRound(0.01, 1.1, 50)
    two, three = epsilon([one] * 2, delta=1e-5), epsilon([one] * 3, delta=1e-5)
    config = config_with(tmp_path, (two + three) / 2)  # two runs fit, a third does not
    _, first = dp_round(monkeypatch, tmp_path, config, 0)
    assert first["stop"] is False
    _, second = dp_round(monkeypatch, tmp_path, config, 1)
    assert second["stop"] is True and second["reason"].startswith("privacy budget spent: f1 would reach epsilon")
    # a new campaign warm-started from it is refused at prepare: its lineage spent the budget
    warm = config_with(tmp_path, (two + three) / 2, warm_start=True)
    with pytest.raises(RoundError, match="privacy budget spent: 0 of 2 facilities could train within their budgets"):
        prepare(monkeypatch, warm, campaign="offline-next")
    assert not (tmp_path / "storage" / "offline-next" / "round-0000").exists()


@pytest.mark.parametrize(
    ("privacy", "message"),
    [(None, "reports no DP-SGD run"), ({**DP, "noise_multiplier": 0.5}, "privacy.noise_multiplier is 0.5, the plan's is 1.1"),
     ({**DP, "poisson": False}, "privacy.poisson"),
     ({**DP, "train_loss": 2.5}, "reports train_loss, which a DP-SGD run withholds")],
)  # fmt: skip
def test_a_facility_that_did_not_run_the_plans_dp_sgd_is_set_aside(tmp_path, monkeypatch, privacy, message):
    config = config_with(tmp_path, 100.0)
    extra = {"train_loss": privacy.pop("train_loss")} if privacy and "train_loss" in privacy else {}
    trained = model_folder(tmp_path / "t", {"w": torch.ones(4)},
                           {"num_samples": 8, **extra, **({"privacy": privacy} if privacy else {})})  # fmt: skip
    fake_transfers(monkeypatch, {"f1": trained, "f2": trained})
    sealed = prepare(monkeypatch, config)
    push_step(sealed, "f1")
    write_step(sealed, "f1", "train", {"job_id": "1"})
    with pytest.raises(FacilityRefused, match=message):
        pull_step(sealed, "f1")


def test_withheld_validation_losses_are_asked_for_and_checked(tmp_path, monkeypatch):
    config = write_config(tmp_path, privacy={"noise_multiplier": 1.1, "withhold_validation": True})
    trained = model_folder(tmp_path / "t", {"w": torch.ones(4)}, {"num_samples": 8, "val_loss_after": 2.0, "privacy": DP})
    fake_transfers(monkeypatch, {"f1": trained, "f2": trained})
    sealed = prepare(monkeypatch, config)
    assert "--dp-withhold-validation" in sealed.plan.facility("f1").command
    push_step(sealed, "f1")
    write_step(sealed, "f1", "train", {"job_id": "1"})
    with pytest.raises(FacilityRefused, match="reports val_loss_after, which a DP-SGD run withholds"):
        pull_step(sealed, "f1")
