"""SlurmJobSensor waits for a job submitted elsewhere, by id or by name (and tag), deferring to
the same trigger as the operator, or poking from a worker.

Starts: nothing of its own but Slurm jobs; uses the session's ``testbed`` (``site1``). Jobs
left by a test are cancelled when it ends.
"""

from __future__ import annotations

import shlex

import pytest
from xffl_airflow.operators.slurm_results import SlurmConfigError, SlurmJobError, SlurmJobFailed
from xffl_airflow.sensors.slurm import SlurmJobSensor
from xffl_airflow.triggers.slurm import SlurmJobTrigger

from tests.plugins.xffl_airflow.hooks.slurm_support import (
    defer,
    facility_of_tests,
    job_state,
    run_task,
    task_context,
    wait_until,
)

COMMENT = "xffl/slurm_sensor_tests/run/t/-1"


@pytest.fixture
def site1(testbed, monkeypatch):
    yield from facility_of_tests(testbed, monkeypatch, "site1", lambda comment: comment == COMMENT)


def submit(facility, script: str, name: str) -> str:
    command = (f"cd xffl && sbatch --parsable -J {name} --comment={COMMENT} --output=sensor-%x-%j.log "
               f"--wrap {shlex.quote(script)}")  # fmt: skip
    return facility.ssh(command).stdout.strip()


def test_waits_for_a_job_by_id_and_follows_its_log(site1):
    job_id = submit(site1, "sleep 3; echo sensed", "sensed")
    sensor = SlurmJobSensor(
        task_id="by_id", ssh_conn_id=site1.conn_id, job_id=job_id, poll_interval=2
    )
    trigger, _ = defer(sensor, task_context("by_id"))
    assert isinstance(trigger, SlurmJobTrigger) and trigger.cancel_on_kill is False
    assert trigger.log_path == f"{site1.workdir}/sensor-sensed-{job_id}.log"  # %x and %j filled in
    sensor = SlurmJobSensor(
        task_id="by_id", ssh_conn_id=site1.conn_id, job_id=job_id, poll_interval=2
    )
    report = run_task(sensor, task_context("by_id"))
    assert (report["job_id"], report["state"], report["exit_code"]) == (job_id, "COMPLETED", "0:0")


def test_waits_for_the_newest_job_with_a_name_and_comment(site1):
    submit(site1, "true", "named")
    newest = submit(site1, "sleep 2; exit 2", "named")
    sensor = SlurmJobSensor(task_id="by_name", ssh_conn_id=site1.conn_id, job_name="named", comment=COMMENT,
                            poll_interval=2, log_tail_lines=3)  # fmt: skip
    with pytest.raises(SlurmJobFailed) as caught:
        run_task(sensor, task_context("by_name"))
    assert caught.value.report["job_id"] == newest and "exit code 2:0" in str(caught.value)


def test_poke_mode_from_a_worker(site1):
    job_id = submit(site1, "exit 0", "poked")
    sensor = SlurmJobSensor(task_id="poke", ssh_conn_id=site1.conn_id, job_id=job_id, deferrable=False,
                            poll_interval=1, timeout=60)  # fmt: skip
    wait_until(lambda: sensor.poke(task_context("poke")), timeout=60, what="poke true")


def test_an_ended_job_is_reported_without_deferring(site1):
    job_id = submit(site1, "echo quick", "quick")
    wait_until(lambda: job_state(site1, job_id) == "COMPLETED", what="job done")
    sensor = SlurmJobSensor(task_id="ended", ssh_conn_id=site1.conn_id, job_id=job_id)
    assert sensor.execute(task_context("ended"))["state"] == "COMPLETED"


def test_no_such_job_name_and_bad_input(site1):
    with pytest.raises(SlurmJobError, match="no job named 'nosuchjobname'"):
        SlurmJobSensor(task_id="none", ssh_conn_id=site1.conn_id, job_name="nosuchjobname").execute(
            task_context("none")
        )
    with pytest.raises(SlurmConfigError, match="exactly one of job_id and job_name"):
        SlurmJobSensor(task_id="both", ssh_conn_id=site1.conn_id, job_id="1", job_name="x")
    with pytest.raises(SlurmConfigError, match="job_id"):
        SlurmJobSensor(task_id="bad", ssh_conn_id=site1.conn_id, job_id="1;id").execute(
            task_context("bad")
        )
