"""The sealed plan in storage: written aside then renamed, kept as it is by a prepare that seals
the same plan again, replaced (voiding the steps done under it) by one with other contents, and
refused when it is not a valid plan. Offline."""

from __future__ import annotations

import json

import pytest
from xffl_airflow.federation.errors import PlanError
from xffl_airflow.federation.rounds.store import load_plan, step_problem, step_result, write_step

from tests.plugins.xffl_airflow.federation.rounds.round_support import dag_of, prepare, write_config


def test_a_prepare_that_seals_the_same_plan_keeps_the_file_and_the_steps_done_under_it(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    sealed = prepare(monkeypatch, config)
    write_step(sealed, "f1", "push", {"files": {}})
    again = prepare(monkeypatch, config)
    assert again.sha256 == sealed.sha256 and again.plan.sealed_at == sealed.plan.sealed_at
    assert step_result(again, "f1", "push") == {"files": {}}
    assert [p.name for p in sealed.path.parent.iterdir() if p.name.startswith(".plan")] == []


def test_another_plan_for_the_round_voids_what_was_done_under_the_first(tmp_path, monkeypatch):
    config = write_config(tmp_path, quorum=1)
    sealed = prepare(monkeypatch, config)
    write_step(sealed, "f1", "push", {"files": {}})
    resealed = prepare(monkeypatch, config, max_rounds=5)
    assert resealed.sha256 != sealed.sha256
    assert load_plan(dag_of(config), "offline", 0).sha256 == resealed.sha256
    assert step_result(resealed, "f1", "push") is None
    assert "ran under another plan of this round" in step_problem(resealed, "f1", "push")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda plan: plan.update(facilities=[{**plan["facilities"][0], "command": 7}]), "facilities.0.command"),
        (lambda plan: plan.update(extra="x"), "extra: Extra inputs are not permitted"),
        (lambda plan: plan.update(round="0"), "round: Input should be a valid integer"),
    ],
)
def test_a_plan_that_does_not_validate_is_refused_naming_the_field(tmp_path, monkeypatch, edit, message):
    config = write_config(tmp_path)
    sealed = prepare(monkeypatch, config)
    plan = json.loads(sealed.path.read_text())
    edit(plan)
    sealed.path.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=f"not a valid round plan: {message}"):
        load_plan(dag_of(config), "offline", 0)


def test_the_plan_holds_what_every_later_step_obeys(tmp_path, monkeypatch):
    config = write_config(tmp_path, facilities=("f1",), aggregation={"strategy": "fedadam",
                          "options": {"server_learning_rate": 0.01}}, quorum=1)  # fmt: skip
    plan = prepare(monkeypatch, config).plan
    facility = plan.facility("f1")
    assert (plan.dag_id, plan.campaign, plan.round, plan.quorum) == ("xffl_offline", "offline", 0, 1)
    assert (plan.strategy, plan.strategy_options) == ("fedadam", {"server_learning_rate": 0.01})
    assert facility.conn_id == "facility_f1" and facility.workdir == "/home/f1/xffl"
    assert facility.jobs_dir == "/home/f1/xffl/xffl_offline/offline/round-0000/jobs"
    assert "--model /home/f1/xffl/xffl_offline/offline/round-0000/global" in facility.command
    assert facility.sbatch == {"preamble": []}
    assert set(plan.input_model_sha256) == {"config.json", "model.safetensors"}
