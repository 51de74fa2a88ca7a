"""A cluster that forgets ended jobs: no accounting storage (plain ``sacct`` says it is
disabled), a completion log users cannot read (``sacct -c`` fails: it is root's, as Slurm
makes it), and a ``MinJobAge`` of 2 s. The poller first looks after the jobs left squeue and
scontrol; the end record each batch script wrote beside its log tells how they ended.

Starts: one facility of its own (``Testbed.up(1, min_job_age=2)``: slurmctld, slurmd, sshd,
munged; its completion log handed back to root), stopped by ``down(purge=True)`` at the end.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from xffl_airflow.operators.slurm import SlurmOperator
from xffl_airflow.triggers.slurm import SlurmJobTrigger

from tests.conftest import facility_python
from tests.plugins.xffl_airflow.hooks.slurm_support import (
    defer,
    first_event,
    task_context,
    wait_until,
)


@pytest.fixture(scope="module")
def forgetful_facility(starts_facilities):
    from xffl_testbed.facilities import Testbed

    bed = Testbed.up(1, names=["noacct"], min_job_age=2, python=facility_python())
    try:
        facility = bed.facilities[0]
        os.chown(os.path.join(facility.facility_dir, "log", "jobcomp.txt"), 0, 0)
        yield facility
    finally:
        bed.down(purge=True)


@pytest.fixture
def noacct(forgetful_facility, monkeypatch):
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{forgetful_facility.conn_id.upper()}",
        json.dumps(forgetful_facility.connection),
    )
    return forgetful_facility


def forgotten(facility, job_id: str) -> bool:
    out = facility.ssh(
        f"squeue -h -t all -j {job_id},1 -o %i; scontrol show -o job {job_id}", check=False
    )
    return job_id not in out.stdout.split() and "Invalid job id" in out.stderr


def submitted(facility, task_id: str, command: str) -> SlurmJobTrigger:
    op = SlurmOperator(task_id=task_id, ssh_conn_id=facility.conn_id, command=command,
                       remote_workdir="xffl/noacct", poll_interval=2)  # fmt: skip
    trigger, _ = defer(op, task_context(task_id, dag_id="slurm_noacct"))
    return trigger


def test_forgotten_jobs_are_read_from_their_end_records(noacct, capsys):
    assert "accounting storage is disabled" in noacct.ssh("sacct", check=False).stderr
    assert "Permission denied" in noacct.ssh("sacct -c", check=False).stderr
    ok = submitted(noacct, "fine", "echo fine")
    bad = submitted(noacct, "broken", "echo broken; exit 3")
    for trigger in (ok, bad):
        wait_until(
            lambda t=trigger: forgotten(noacct, t.job_id),
            timeout=120,
            every=1,
            what=f"job {trigger.job_id} forgotten",
        )

    async def both():
        return await asyncio.gather(first_event(ok, timeout=120), first_event(bad, timeout=120))

    good, failed = asyncio.run(both())
    assert (good["status"], good["state"], good["exit_code"]) == ("success", "COMPLETED", "0:0")
    assert "end record" in good["message"] and good["run_s"] is not None
    assert (failed["status"], failed["state"], failed["exit_code"]) == ("failed", "FAILED", "3:0")
    assert failed["log_path"].endswith(f"-{bad.job_id}.log")
    # the trigger's log is the task's log (structlog writes it to stdout here)
    warnings = [
        line for line in capsys.readouterr().out.splitlines() if "accounting cannot tell" in line
    ]
    assert len(warnings) == 2  # once per trigger (task log), not once per poll
    assert "slurmdbd" in warnings[0] and "Permission denied" in warnings[0]


def test_a_forgotten_job_without_a_record_is_an_error_with_the_fix(noacct):
    trigger = submitted(noacct, "silent", "echo silent")
    wait_until(
        lambda: forgotten(noacct, trigger.job_id), timeout=120, every=1, what="job forgotten"
    )
    noacct.ssh(f"rm -f -- {trigger.log_path}.end")
    watcher = SlurmJobTrigger(ssh_conn_id=noacct.conn_id, job_id=trigger.job_id, log_path=trigger.log_path,
                              poll_interval=1, lost_after=3)  # fmt: skip
    event = asyncio.run(first_event(watcher, timeout=60))
    assert event["status"] == "error" and event["state"] is None
    for words in (
        "cannot be learned",
        "MinJobAge",
        "accounting storage is disabled",
        "slurmdbd",
        ".log.end",
    ):
        assert words in event["message"]
