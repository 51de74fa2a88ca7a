"""The release run at each facility: push the models, evaluate them in a Slurm job, pull the
results. Each step obeys the sealed release plan and records its result under it.

The push sends the campaign's last global model (and the last release's model) and checks that
what it sent is what the plan sealed; the job runs ``python -m xffl_tasks.evaluate`` as the plan
says (``ReleaseEvaluateOperator``); the pull brings back only ``evaluation.json`` (a budget of
one small file per evaluation) and reads it with the bounded reader: what a facility sends back
is untrusted input, and a bad file sets the facility aside with the reason.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from airflow.sdk import Context

from xffl_airflow.federation.errors import FacilityRefused, RoundError
from xffl_airflow.federation.names import FederationDag, check_campaign
from xffl_airflow.federation.releases.plan import LAST, RELEASE
from xffl_airflow.federation.releases.store import (
    SealedRelease,
    load_release,
    require_step,
    write_step,
)
from xffl_airflow.federation.sealed_job import SealedJob, SealedJobOperator

log = logging.getLogger(__name__)
EVALUATION_FILE = "evaluation.json"
MAX_EVALUATION_BYTES = 64 << 10


def release_of(dag: FederationDag, context: Any) -> SealedRelease:
    """The running release run's sealed plan (its campaign: the run's ``campaign`` parameter)."""
    conf = {**dict(context["params"]), **dict(getattr(context["dag_run"], "conf", None) or {})}
    return load_release(dag, check_campaign(conf.get("campaign"), "params.campaign"))


def _remote(sealed: SealedRelease, facility: str):
    from xffl_airflow.transfer import RemoteFacility

    entry = sealed.plan.facility(facility)
    return RemoteFacility(name=facility, conn_id=entry.conn_id, workdir=entry.workdir)


def push_step(sealed: SealedRelease, facility: str) -> dict[str, Any]:
    """Sends the last global model (and the last release's model) to the facility."""
    from xffl_airflow.transfer import push

    plan, folder = sealed.plan, sealed.layout.folder
    entry = plan.facility(facility)
    sent = {LAST: push(folder / "last", _remote(sealed, facility), entry.remote_last).to_dict()}
    expected = {LAST: plan.last_model_sha256}
    if plan.previous_release is not None and entry.remote_release:
        sent[RELEASE] = push(folder / "previous", _remote(sealed, facility), entry.remote_release).to_dict()
        expected[RELEASE] = plan.previous_release.model_sha256
    for name, report in sent.items():
        if report["files"] != expected[name]:
            raise RoundError(f"{sealed.where()}: {facility}: the {name} model sent differs from the one the plan "
                             "sealed; its storage changed since prepare_release: run the release again")  # fmt: skip
    write_step(sealed, facility, "push", sent)
    log.info("%s: sent %s", facility, ", ".join(f"{k} ({v['bytes_sent']} bytes)" for k, v in sent.items()))
    return sent


def evaluation_budget():
    from xffl_airflow.transfer import FileAllowance, PullBudget

    return PullBudget(max_files=1, max_total_bytes=MAX_EVALUATION_BYTES,
                      allowed=(FileAllowance.exact(EVALUATION_FILE, MAX_EVALUATION_BYTES),))  # fmt: skip


def pull_step(sealed: SealedRelease, facility: str) -> dict[str, Any]:
    """Brings the facility's evaluation.json files back and reads them (bounded, checked)."""
    from xffl_airflow.transfer import PullRefused, pull
    from xffl_tasks.evaluate.result import EvaluationFileError, read_evaluation

    require_step(sealed, facility, "evaluate", before="be pulled")
    entry = sealed.plan.facility(facility)
    losses: dict[str, dict[str, Any]] = {}
    for index, remote in enumerate(entry.remote_outputs):
        target = sealed.layout.evaluation(facility, index)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            pull(_remote(sealed, facility), remote, target, budget=evaluation_budget())
            found = read_evaluation(target / EVALUATION_FILE, facility)
        except (PullRefused, EvaluationFileError) as error:
            raise FacilityRefused(f"evaluation refused: {error}") from None
        for name, candidate in found.candidates.items():
            losses[name] = {"val_loss": candidate.val_loss, "val_tokens": candidate.val_tokens,
                            "val_sequences": candidate.val_sequences}  # fmt: skip
    expected = {LAST} | ({RELEASE} if sealed.plan.previous_release is not None else set())
    if set(losses) != expected:
        raise FacilityRefused(f"evaluation refused: {facility} evaluated {sorted(losses)}, the plan asked for {sorted(expected)}")
    write_step(sealed, facility, "pull", {"candidates": losses})
    log.info("%s: %s", facility, ", ".join(f"{k} val loss {v['val_loss']:.4f}" for k, v in sorted(losses.items())))
    return {"candidates": losses}


def record_failure(sealed: SealedRelease, facility: str, task_id: str, try_number: int, error: Any, *, refused: bool) -> None:
    from xffl_airflow.federation.sealing import now
    from xffl_airflow.secrets_scrub import scrub_env
    from xffl_tasks.manifest import write_json_atomic

    path = sealed.layout.failure(facility)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"facility": facility, "task_id": task_id, "try_number": try_number, "refused": refused,
                             "error": scrub_env(str(error))[-4000:], "plan_sha256": sealed.sha256, "at": now()})  # fmt: skip


class ReleaseEvaluateOperator(SealedJobOperator):
    """Evaluates the campaign's last global model (and the last release) at ``facility``."""

    def job_of(self, context: Context) -> SealedJob:
        sealed = release_of(self.federation, context)
        entry = sealed.plan.facility(self.facility)
        return SealedJob(
            where=sealed.where(), plan_path=str(sealed.path), plan_sha256=sealed.sha256, conn_id=entry.conn_id,
            login=entry.login.facility_login, command=entry.command, sbatch=entry.sbatch, jobs_dir=entry.jobs_dir,
            check_ready=partial(require_step, sealed, self.facility, "push", before="evaluate"),
            record=partial(write_step, sealed, self.facility, "evaluate"),
        )  # fmt: skip


def evaluation_of(sealed: SealedRelease, facility: str) -> Path:
    return sealed.layout.evaluation(facility, 0) / EVALUATION_FILE
