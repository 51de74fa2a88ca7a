"""Jobs whose record slurmctld has purged (past ``MinJobAge``) are resolved through accounting:
``sacct``, then ``sacct -c`` (the job completion log) where accounting storage is disabled, as
on the local facilities. A job no source knows is "lost": an error after ``lost_after``, never
a failure.

Starts: one facility of its own (``Testbed.up(1, min_job_age=2)``: slurmctld, slurmd, sshd,
munged), stopped by ``down(purge=True)`` at the end of the module.

Slurm 22.05's ``sacct -c`` opens the completion log for writing (the jobcomp plugin's init),
so the facility user must own it; the fixture hands it over (see docs/slurm.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex

import pytest
from xffl_airflow.operators.slurm import STATE_KEY, SlurmOperator
from xffl_airflow.triggers.slurm import SlurmJobTrigger

from tests.conftest import facility_python
from tests.plugins.xffl_airflow.hooks.slurm_support import (
    MemoryStateStore,
    defer,
    first_event,
    run_task,
    task_context,
    wait_until,
)


@pytest.fixture(scope="module")
def purging_facility(starts_facilities):
    from xffl_testbed.facilities import Testbed

    bed = Testbed.up(1, names=["agey"], min_job_age=2, python=facility_python())
    try:
        facility = bed.facilities[0]
        jobcomp = os.path.join(facility.facility_dir, "log", "jobcomp.txt")
        os.chown(jobcomp, facility_uid(facility.user), -1)
        yield facility
    finally:
        bed.down(purge=True)


def facility_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


@pytest.fixture
def agey(purging_facility, monkeypatch):
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{purging_facility.conn_id.upper()}", json.dumps(purging_facility.connection)
    )
    return purging_facility


def purged(facility, job_id: str) -> bool:
    out = facility.ssh(f"squeue -h -t all -j {job_id},1 -o %i", check=False).stdout.split()
    return job_id not in out


def submit(facility, script: str) -> str:
    return facility.ssh(f"cd xffl && sbatch --parsable --wrap {shlex.quote(script)}").stdout.strip()


def test_a_purged_job_is_resolved_through_sacct(agey):
    job_id = submit(agey, "echo done; exit 4")
    wait_until(lambda: purged(agey, job_id), timeout=240, every=2, what=f"job {job_id} purged")
    event = asyncio.run(
        first_event(SlurmJobTrigger(ssh_conn_id=agey.conn_id, job_id=job_id, poll_interval=2))
    )
    assert (event["status"], event["state"], event["exit_code"]) == ("failed", "FAILED", "4:0")
    assert event["end_time"] is not None and event["run_s"] is not None


def test_a_retry_reattaches_to_a_purged_successful_job_without_resubmitting(agey):
    # the job succeeded while its worker was lost (execute_complete never ran), and slurmctld
    # purged it before the retry looked: the retry finds its success through accounting
    store = MemoryStateStore()
    context = task_context(
        "purge_ok", dag_id="slurm_accounting", run_id="manual__purged", store=store
    )
    op = SlurmOperator(task_id="purge_ok", ssh_conn_id=agey.conn_id, command="echo fine",
                       remote_workdir="xffl/acct", poll_interval=2)  # fmt: skip
    trigger, _ = defer(op, context)
    event = asyncio.run(first_event(trigger))
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    wait_until(lambda: purged(agey, trigger.job_id), timeout=240, every=2, what="job purged")
    again = SlurmOperator(task_id="purge_ok", ssh_conn_id=agey.conn_id, command="echo fine",
                          remote_workdir="xffl/acct", poll_interval=2).execute(context)  # fmt: skip
    assert (again["job_id"], again["state"]) == (trigger.job_id, "COMPLETED")
    stored = store.get(STATE_KEY)
    assert (stored["job_id"], stored["reported"]) == (trigger.job_id, True)
    # reported now: the same task cleared afterwards runs the command again
    cleared = run_task(SlurmOperator(task_id="purge_ok", ssh_conn_id=agey.conn_id, command="echo fine",
                                     remote_workdir="xffl/acct", poll_interval=2), context)  # fmt: skip
    assert cleared["state"] == "COMPLETED" and cleared["job_id"] != trigger.job_id


def test_a_job_no_source_knows_is_an_error_not_a_failure(agey):
    trigger = SlurmJobTrigger(
        ssh_conn_id=agey.conn_id, job_id="999999", poll_interval=1, lost_after=3
    )
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "error"
    assert "unknown to squeue, sacct and scontrol" in event["message"]
