"""SlurmHook over a real facility: one SSH connection per hook, sync and async sides, the script
written aside then renamed, the remote command count.

Starts: nothing of its own but Slurm jobs; uses the session's ``testbed`` (``site1``).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from xffl_airflow.hooks.slurm import SlurmHook, SlurmSubmitError, remote_command_count

from tests.plugins.xffl_airflow.hooks.slurm_support import job_state, use_connections, wait_until

SCRIPT = "#!/bin/bash\n#SBATCH --comment=xffl/slurm_hook_tests/r/t/-1\n#SBATCH --output={out}\necho {word}\n"


@pytest.fixture
def site1(testbed, monkeypatch):
    use_connections(monkeypatch, testbed)
    return testbed.facility("site1")


def test_sync_side_submits_queries_tails_and_cancels_over_one_connection(site1):
    before = remote_command_count(site1.conn_id)
    with SlurmHook(ssh_conn_id=site1.conn_id) as hook:
        workdir = hook.resolve_workdir("xffl/hook-tests/nested")
        assert workdir == f"{site1.workdir}/hook-tests/nested"
        out = f"{workdir}/hook-%j.log"
        job_id, cluster = hook.submit(
            SCRIPT.format(out=out, word="hooked"), workdir=workdir, script_name="hook.sbatch"
        )
        assert job_id.isdigit() and cluster is None
        wait_until(
            lambda: hook.query([job_id]).jobs[job_id].state == "COMPLETED", what="job completed"
        )
        assert hook.log_tail(job_id, out.replace("%j", job_id), 5) == ["hooked"]
        assert hook.log_tail(job_id, f"{workdir}/missing.log", 5) == []
        sleeper, _ = hook.submit(SCRIPT.format(out=out, word="x") + "sleep 100\n", workdir=workdir,
                                 script_name="sleeper.sbatch")  # fmt: skip
        hook.cancel(sleeper)
        first_connection = hook._connection
    assert first_connection is not None and hook._connection is None  # closed on exit
    wait_until(lambda: job_state(site1, sleeper) == "CANCELLED", what="job cancelled")
    # no temporary script left behind: written aside, then renamed
    files = set(os.listdir(f"{site1.workdir}/hook-tests/nested"))
    assert {"hook.sbatch", "sleeper.sbatch", f"hook-{job_id}.log"} <= files
    assert not [name for name in files if name.startswith(".")]
    assert remote_command_count(site1.conn_id) - before >= 6


def test_sync_side_works_inside_a_running_event_loop(site1):
    async def inside_a_loop():
        with SlurmHook(ssh_conn_id=site1.conn_id) as hook:
            return hook.resolve_workdir("xffl")

    assert asyncio.run(inside_a_loop()) == site1.workdir


def test_async_side_and_a_refused_submission(site1):
    async def submit_bad():
        async with SlurmHook(ssh_conn_id=site1.conn_id) as hook:
            workdir = await hook.aresolve_workdir("xffl/hook-tests")
            await hook.asubmit(
                "#!/bin/bash\n#SBATCH --partition=nope\ntrue\n",
                workdir=workdir,
                script_name="bad.sbatch",
            )

    with pytest.raises(
        SlurmSubmitError, match=rf"'{site1.conn_id}': sbatch refused the job: .*Invalid partition"
    ):
        asyncio.run(submit_bad())
