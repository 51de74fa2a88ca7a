"""Exactly once whatever the shell prints: an sbatch whose answer is lost or garbled is never
followed by another sbatch; the job is looked up by its tag first, in this try and in a retry.

Unit level: the operator runs against a fake hook (``_hook`` replaced); nothing is started.
"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import TaskDeferred
from xffl_airflow.hooks.slurm import QueryResult, SlurmSubmitUnknown
from xffl_airflow.operators.slurm import STATE_KEY, SlurmOperator
from xffl_airflow.operators.slurm_results import SlurmConfigError, SlurmJobError
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.states import SlurmJob

from tests.plugins.xffl_airflow.hooks.slurm_support import MemoryStateStore, task_context

COMMENT = "xffl/lost/manual__1/train/-1"


class FakeHook:
    """sbatch submits (``jobs`` grows) but its answer comes back garbled."""

    def __init__(self, jobs: list[SlurmJob], *, garbled: bool = True, visible: bool = True):
        self.jobs, self.garbled, self.visible = jobs, garbled, visible
        self.sbatches = 0
        self.lookups = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def resolve_workdir(self, workdir):
        return "/home/u/" + workdir

    def submit(self, script, *, workdir, script_name):
        self.sbatches += 1
        job_id = str(100 + len(self.jobs))
        self.jobs.append(SlurmJob(job_id, "PENDING", name="lost.train", comment=COMMENT))
        if self.garbled:
            raise SlurmSubmitUnknown("site1", "sbatch --parsable printed no job id: 'garbage'")
        return job_id, None

    def find_tagged(self, job_name, comment):
        self.lookups += 1
        assert comment == COMMENT
        return "+0000", [j for j in self.jobs if j.comment == comment] if self.visible else []

    def query(self, job_ids, end_records=None):
        return QueryResult(tz="+0000", jobs={j.job_id: j for j in self.jobs if j.job_id in job_ids})


def run(hook: FakeHook, store: MemoryStateStore, monkeypatch):
    op = SlurmOperator(task_id="train", ssh_conn_id="site1", command="true", remote_workdir="w",
                       job_name="lost.train", login=FacilityLogin.of(["module load slurm"], "/opt/slurm/bin"))  # fmt: skip
    monkeypatch.setattr(op, "_hook", lambda: hook)
    context = task_context("train", dag_id="lost", run_id="manual__1", store=store)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    return deferred.value.trigger


def test_a_garbled_answer_finds_the_job_by_its_tag_and_never_resubmits(monkeypatch):
    store = MemoryStateStore()
    hook = FakeHook([SlurmJob("90", "FAILED", exit_code="1:0", comment=COMMENT)])
    store.set(STATE_KEY, {"job_id": "90", "conn_id": "site1"})  # an earlier try's failed job
    trigger = run(hook, store, monkeypatch)
    assert hook.sbatches == 1 and trigger.job_id == "101"  # the new one, not the failed 90
    assert store.get(STATE_KEY)["job_id"] == "101"
    assert trigger.serialize()[1]["login"] == {"preamble": ["module load slurm"], "slurm_bin": "/opt/slurm/bin"}


def test_a_lost_answer_with_no_job_found_fails_the_try_and_the_retry_looks_again(monkeypatch):
    store = MemoryStateStore()
    hook = FakeHook([], visible=False)
    with pytest.raises(SlurmJobError, match="no job tagged .* not submitting again"):
        run(hook, store, monkeypatch)
    assert hook.sbatches == 1 and store.get(STATE_KEY) == {
        "conn_id": "site1", "job_name": "lost.train", "unconfirmed_after": None,
    }  # fmt: skip
    hook.visible = True  # the job shows up now: the retry attaches to it
    trigger = run(hook, store, monkeypatch)
    assert hook.sbatches == 1 and trigger.job_id == "100"


def test_a_retry_submits_when_the_lost_answer_had_submitted_nothing(monkeypatch):
    store = MemoryStateStore()
    store.set(STATE_KEY, {"conn_id": "site1", "job_name": "lost.train", "unconfirmed_after": "90"})
    hook = FakeHook([SlurmJob("90", "FAILED", exit_code="1:0", comment=COMMENT)], garbled=False)
    trigger = run(hook, store, monkeypatch)
    assert hook.sbatches == 1 and trigger.job_id == "101" and hook.lookups == 1


@pytest.mark.parametrize(
    ("login", "words"),
    [
        (
            {"login_preamble": ["module load slurm\nrm -rf ~"]},
            "login_preamble[0]: must be a single",
        ),
        ({"login_preamble": "module load slurm"}, "must be a list of shell lines"),
        ({"slurm_bin": "opt/slurm/bin"}, "slurm_bin: 'opt/slurm/bin' must be an absolute"),
        ({"slurm_bin": "/opt/$(x)/bin"}, "slurm_bin: '/opt/$(x)/bin' is not a safe remote path"),
    ],
)
def test_a_bad_login_environment_is_refused_when_it_is_made(login, words):
    with pytest.raises(SlurmInputError, match=words.replace("[", r"\[").replace("$", r"\$")
                       .replace("(", r"\(").replace(")", r"\)")):  # fmt: skip
        FacilityLogin.of(login.get("login_preamble"), login.get("slurm_bin"))


def test_the_operator_takes_only_a_made_login_environment():
    with pytest.raises(SlurmConfigError, match="login must be a FacilityLogin, got dict"):
        SlurmOperator(task_id="t", ssh_conn_id="site1", command="true", remote_workdir="w",
                      login={"preamble": ["module load slurm"]})  # fmt: skip


def test_a_cluster_sbatch_did_not_name_is_left_out_then_filled_in_at_the_end(monkeypatch):
    """Never ``cluster: null`` in the task's state store: left out until the job's report says."""
    store = MemoryStateStore()
    hook = FakeHook([], garbled=False)  # sbatch --parsable answered "100": no cluster
    trigger = run(hook, store, monkeypatch)
    assert "cluster" not in store.get(STATE_KEY) and store.get(STATE_KEY)["job_id"] == trigger.job_id
    op = SlurmOperator(task_id="train", ssh_conn_id="site1", command="true", remote_workdir="w", job_name="lost.train")
    event = {"status": "success", "job_id": trigger.job_id, "message": "ended COMPLETED", "conn_id": "site1",
             "cluster": "site1", "state": "COMPLETED", "exit_code": "0:0", "reason": None, "queue_wait_s": 0.0,
             "run_s": 1.0, "log_path": "/w/x.log", "log_tail": []}  # fmt: skip
    report = op.execute_complete(task_context("train", dag_id="lost", run_id="manual__1", store=store), event)
    assert report["cluster"] == "site1"
    assert store.get(STATE_KEY)["cluster"] == "site1" and store.get(STATE_KEY)["reported"] is True
