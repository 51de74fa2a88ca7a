"""Real login shells that print, and a facility that needs ``module load``: submit, poll, tail
and cancel all work through the framing; a login preamble makes Slurm reachable; an sbatch
whose answer is garbled is looked up by its tag, never submitted twice.

Starts: nothing of its own but Slurm jobs; uses the session's ``testbed`` (``site2``) and
writes quirks into that facility user's ``~/.bashrc`` (bash reads it for commands run by
sshd), restored when each test ends. Jobs left by a test are cancelled when it ends.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest
from xffl_airflow.hooks.slurm import SlurmHook
from xffl_airflow.operators.slurm import SlurmOperator
from xffl_airflow.operators.slurm_results import SlurmJobError, SlurmJobFailed
from xffl_airflow.slurm.login import FacilityLogin

from tests.plugins.xffl_airflow.hooks.slurm_support import (
    MemoryStateStore,
    facility_of_tests,
    run_task,
    tagged_jobs,
    task_context,
    wait_until,
)

DAG_ID = "noisy_login_tests"

QUIRKS = {
    "banner": "echo 'Welcome to login01'; echo 'Quota on /home: 91% used'; echo 'Maintenance Fri'",
    "no-newline": "printf 'Last login: today from 10.0.0.1'",
    "escape": "printf '\\033]0;%s@login01\\007' \"$USER\"",
    "stderr": "echo 'module: StdEnv loaded' >&2; printf 'quota warning' >&2",
}


@pytest.fixture
def site(testbed, monkeypatch):
    yield from facility_of_tests(testbed, monkeypatch, "site2", lambda c: f"xffl/{DAG_ID}/" in c)


@pytest.fixture
def bashrc(site):
    """Writes the facility user's ``~/.bashrc`` (and restores the original afterwards)."""
    path = Path(site.home) / ".bashrc"
    original = path.read_bytes() if path.exists() else None

    def write(text: str) -> None:
        path.write_text(text + "\n")
        path.chmod(0o644)

    yield write
    if original is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(original)


def context(task_id: str, request, store: MemoryStateStore | None = None) -> dict:
    run_id = f"manual__{request.node.name[:50]}-{os.getpid()}-{int(time.time())}"
    run_id = "".join(c if c.isalnum() or c in "_.~:+-" else "_" for c in run_id)
    return task_context(task_id, dag_id=DAG_ID, run_id=run_id, store=store)


def operator(task_id: str, site, command: str, **kwargs) -> SlurmOperator:
    return SlurmOperator(task_id=task_id, ssh_conn_id=site.conn_id, command=command,
                         remote_workdir="xffl/noisy-tests", poll_interval=3, **kwargs)  # fmt: skip


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_submit_poll_tail_and_cancel_through_a_noisy_login_shell(site, bashrc, request, quirk):
    bashrc(QUIRKS[quirk])
    printed = site.ssh("true")
    assert (printed.stdout + printed.stderr).strip()  # the login shell really prints
    op = operator("fails", site, "echo step-one; echo 'boom' >&2; exit 3", log_tail_lines=5,
                  follow_log=False)  # fmt: skip
    with pytest.raises(SlurmJobFailed) as caught:
        run_task(op, context("fails", request), timeout=120)
    assert "exit code 3:0" in str(caught.value) and str(caught.value).endswith("step-one\nboom")
    with SlurmHook(ssh_conn_id=site.conn_id) as hook:
        workdir = hook.resolve_workdir("xffl/noisy-tests")
        assert workdir == f"{site.workdir}/noisy-tests"
        comment = f"xffl/{DAG_ID}/held/{quirk}/-1"
        script = f"#!/bin/sh\n#SBATCH --hold\n#SBATCH --comment={comment}\ntrue\n"
        job_id, _ = hook.submit(script, workdir=workdir, script_name="held.sbatch")
        assert hook.query([job_id]).jobs[job_id].state == "PENDING"
        hook.cancel(job_id)
        assert hook.query([job_id]).jobs[job_id].state == "CANCELLED"


def module_bashrc(site) -> str:
    """A login node where Slurm answers only after ``module load slurm``, noisily."""
    conf = shlex.quote(site.slurm_conf)
    return (
        "unset SLURM_CONF\n"
        "echo 'Lmod: 3 modules available' >&2; printf '\\033]0;login01\\007'\n"
        f"module() {{ if [ \"$1 $2\" = 'load slurm' ]; then echo 'Loading slurm/22.05'; "
        f'export SLURM_CONF={conf}; else echo "module: $2 not found" >&2; return 1; fi; }}'
    )


def test_a_facility_that_needs_module_load_works_with_its_login_preamble(site, bashrc, request):
    bashrc(module_bashrc(site))
    assert "SLURM_CONF" not in site.ssh("env").stdout  # Slurm is not reachable without it
    op = operator("modules", site, "echo trained", login=FacilityLogin.of(["module load slurm"]))
    report = run_task(op, context("modules", request), timeout=120)
    assert (report["state"], report["exit_code"]) == ("COMPLETED", "0:0")
    assert Path(report["log_path"]).read_text() == "trained\n"
    without = operator("no_modules", site, "echo trained")
    with pytest.raises(SlurmJobError) as caught:
        run_task(without, context("no_modules", request), timeout=120)
    message = str(caught.value)
    assert site.conn_id in message and "squeue failed" in message
    assert "config" in message.lower()  # Slurm's own words: it found no configuration


def test_a_garbled_sbatch_answer_is_looked_up_by_its_tag_not_resubmitted(site, bashrc, request):
    bashrc(QUIRKS["banner"])
    wrapper = Path(site.home) / "garbling-bin"
    wrapper.mkdir(exist_ok=True)
    (wrapper / "sbatch").write_text(
        '#!/bin/sh\n/usr/bin/sbatch "$@" >/dev/null || exit $?\n'
        "echo 'Your job has been submitted. Have a nice day!'\nexit 0\n"
    )
    (wrapper / "sbatch").chmod(0o755)
    store = MemoryStateStore()
    ctx = context("garbled", request, store)
    op = operator("garbled", site, "echo once", login=FacilityLogin.of(slurm_bin=str(wrapper)))
    report = run_task(op, ctx, timeout=120)
    assert report["state"] == "COMPLETED"
    comment = f"xffl/{DAG_ID}/{ctx['ti'].run_id}/garbled/-1"
    jobs = wait_until(lambda: tagged_jobs(site, comment), timeout=10, what="the tagged job")
    assert jobs == [report["job_id"]]  # exactly one job: no second sbatch
    assert store.get("xffl_slurm_job")["job_id"] == report["job_id"]
    assert Path(report["log_path"]).read_text() == "once\n"
