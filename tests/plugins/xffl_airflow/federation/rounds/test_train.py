"""The train task obeys the round's sealed plan: whatever it was built with or given, at execute
time it takes the facility's connection, login environment, job folder, command and sbatch
options from the plan, and it refuses to submit before a push under the same plan. Offline: the
Slurm hook is never reached in these tests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException
from xffl_airflow.federation.dag import build_federation_dag
from xffl_airflow.federation.rounds.store import write_step
from xffl_airflow.slurm.login import FacilityLogin

from tests.plugins.xffl_airflow.federation.rounds.round_support import prepare, write_config

LOGIN = {"login_preamble": ["module load slurm", "export SLURM_TIME_FORMAT=standard"], "slurm_bin": "/opt/slurm/23.02/bin"}


@pytest.fixture
def round_and_dag(tmp_path, monkeypatch):
    config = write_config(tmp_path, facilities=("italy", "czechia"))
    data = __import__("yaml").safe_load(config.read_text())
    data["facilities"][0].update(LOGIN)
    config.write_text(__import__("yaml").safe_dump(data))
    for name in ("italy", "czechia"):
        monkeypatch.setenv(f"AIRFLOW_CONN_FACILITY_{name.upper()}", json.dumps({"conn_type": "ssh", "host": "login.example.org"}))
    sealed = prepare(monkeypatch, config)
    return sealed, build_federation_dag(str(config))


def context(round_number=0):
    dag_run = SimpleNamespace(run_type="manual", conf={"round": round_number})
    return {"params": {"campaign": None, "round": round_number}, "dag_run": dag_run, "logical_date": None}


def test_each_train_task_takes_its_facilitys_login_and_job_from_the_plan(round_and_dag):
    sealed, dag = round_and_dag
    italy, czechia = dag.task_dict["italy.train"], dag.task_dict["czechia.train"]
    assert italy.template_fields == ()  # nothing a run or XCom could render into it
    italy.command, italy.ssh_conn_id = "touch /tmp/owned", "facility_other"  # as if tampered with
    assert italy._obey(context()).plan_sha256 == sealed.sha256
    plan = sealed.plan.facility("italy")
    assert italy.login == FacilityLogin.of(LOGIN["login_preamble"], LOGIN["slurm_bin"])
    assert (italy.ssh_conn_id, italy.command, italy.remote_workdir) == (plan.conn_id, plan.command, plan.jobs_dir)
    assert italy.sbatch == plan.sbatch and italy.job_context == {"plan_sha256": sealed.sha256}
    czechia._obey(context())
    assert czechia.login == FacilityLogin()


def test_the_train_task_refuses_to_submit_before_a_push_under_the_same_plan(round_and_dag, monkeypatch):
    sealed, dag = round_and_dag
    italy = dag.task_dict["italy.train"]
    monkeypatch.setattr(italy, "_hook", lambda: pytest.fail("Slurm was reached"))
    with pytest.raises(AirflowFailException, match="italy cannot train: its push has not succeeded in this round"):
        italy.execute(context())
    write_step(sealed, "italy", "push", {"files": {}, "plan": "another"})
    path = sealed.layout.step_record(0, "italy", "push")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "plan_sha256": "0" * 64}))
    with pytest.raises(AirflowFailException, match="its push ran under another plan of this round"):
        italy.execute(context())


def test_a_run_without_a_sealed_plan_is_refused(round_and_dag):
    _, dag = round_and_dag
    with pytest.raises(AirflowFailException, match="PlanError: campaign offline round 3: no sealed plan"):
        dag.task_dict["italy.train"].execute(context(3))
