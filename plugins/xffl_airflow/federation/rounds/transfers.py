"""A round's transfers: the input model to each facility, each trained model back.

Both read the facility's connection, workdir and folders from the round's sealed plan. The push
checks that the files it sent are the ones the plan sealed (sha256 of each); the pull runs only
after a training that succeeded under the same plan, and checks everything the aggregation
would (what a facility sends back is untrusted input): a facility whose outputs fail is set
aside (``clients/<facility>.rejected``, kept for inspection, never read by the round) and left
out of the round without retries. Each step records its result in the round's storage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import FacilityRefused, RoundError
from xffl_airflow.federation.rounds.store import SealedPlan, now, require_step, write_step
from xffl_tasks.manifest import write_json_atomic

log = logging.getLogger(__name__)


def _remote(sealed: SealedPlan, facility: str):
    from xffl_airflow.transfer import RemoteFacility

    entry = sealed.plan.facility(facility)
    return RemoteFacility(name=facility, conn_id=entry.conn_id, workdir=entry.workdir)


def _check_sent(sealed: SealedPlan, facility: str, sent: dict[str, str], expected: dict[str, str], what: str) -> None:
    if sent != expected:
        changed = sorted(name for name in set(sent) | set(expected) if sent.get(name) != expected.get(name))
        raise RoundError(
            f"{sealed.where()}: {facility}: the {what} sent differs from the one the plan sealed "
            f"({', '.join(changed[:5])}{'...' if len(changed) > 5 else ''}); its storage changed since "
            "prepare: run the round again from prepare"
        )


def push_step(sealed: SealedPlan, facility: str) -> dict[str, Any]:
    """Pushes the round's input model to the facility (unchanged files cost only a hash)."""
    from xffl_airflow.transfer import push

    plan, layout = sealed.plan, sealed.layout
    entry = plan.facility(facility)
    if entry.excluded:  # its train and pull are skipped with it; the manifest says why
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"{facility} does not train in round {plan.round}: {entry.excluded}")
    base = None
    if plan.peft is not None and entry.base_push:  # the base model first: sent in full once, then only hashed
        base = push(layout.pushed_base(plan.round), _remote(sealed, facility), entry.base_push).to_dict()
        _check_sent(sealed, facility, base["files"], plan.peft.base_model_sha256, "base model")
        log.info(
            "%s: base model %s in place at %s (%d bytes sent, %d skipped)",
            facility, plan.peft.base_model, entry.base_push, base["bytes_sent"], base["bytes_skipped"],
        )  # fmt: skip
    if plan.input_model_sha256:
        result = push(layout.pushed_model(plan.round), _remote(sealed, facility), entry.remote_global).to_dict()
        _check_sent(sealed, facility, result["files"], plan.input_model_sha256, "input model")
    else:  # a lora-stacked round 0: only the base
        result = {"files": {}, "bytes_total": 0, "bytes_sent": 0, "bytes_skipped": 0, "files_skipped": 0,
                  "seconds": 0.0, "mbps": 0.0, "retries": 0}  # fmt: skip
    if base is not None:
        result["base"] = base
    write_step(sealed, facility, "push", result)
    log.info(
        "%s: pushed %s (%d bytes sent, %d skipped) in %.2f s",
        facility, plan.input_model, result["bytes_sent"], result["bytes_skipped"], result["seconds"],
    )  # fmt: skip
    return result


def check_pulled(sealed: SealedPlan, facility: str, target: Path) -> dict[str, Any]:
    """The facility's validated metrics, once everything the aggregation would check holds for
    the pulled folder (the same code, ``xffl_tasks.aggregate.client_check``): its claim within
    the plan's ``max_samples``; ``AggregationError`` naming the file and the facility otherwise."""
    from xffl_tasks.aggregate.client_check import check_client_folder

    plan = sealed.plan
    metrics = check_client_folder(Path(plan.input_model), target, name=facility, adapter=plan.peft is not None,
                                  strategy=plan.strategy, max_samples=plan.facility(facility).max_samples)  # fmt: skip
    if plan.privacy is not None:  # the DP-SGD run the plan asked for, or set aside
        from xffl_airflow.federation.rounds.privacy import check_reported

        check_reported(plan, facility, metrics)
    return metrics


def pull_step(sealed: SealedPlan, facility: str) -> dict[str, Any]:
    """Pulls the model trained at the facility into ``round-NNNN/clients/<facility>``."""
    from xffl_airflow.transfer import pull
    from xffl_tasks.aggregate.errors import AggregationError

    plan, layout = sealed.plan, sealed.layout
    from xffl_airflow.transfer import PullBudget, PullRefused

    require_step(sealed, facility, "train", before="be pulled")
    entry = plan.facility(facility)
    target = layout.client_dir(plan.round, facility)
    target.parent.mkdir(parents=True, exist_ok=True)
    # what the facility may write here: the files the pushed layout announces, each bounded
    # by its expected size, in all at most the budget (the config can raise it)
    if entry.adapter_bytes is not None:  # lora-stacked: a fresh adapter of the facility's rank
        budget = PullBudget.for_adapter(entry.adapter_bytes, max_total_bytes=entry.max_pull_bytes,
                                        max_files=entry.max_pull_files)  # fmt: skip
    else:
        budget = PullBudget.for_model(layout.pushed_model(plan.round), adapter=plan.peft is not None,
                                      max_total_bytes=entry.max_pull_bytes, max_files=entry.max_pull_files)  # fmt: skip
    try:
        report = pull(_remote(sealed, facility), entry.remote_local, target, budget=budget).to_dict()
    except PullRefused as error:
        raise FacilityRefused(f"outputs refused: {error}") from None
    try:
        metrics = check_pulled(sealed, facility, target)
    except AggregationError as error:
        aside = target.with_name(f"{target.name}.rejected")
        if aside.exists():
            shutil.rmtree(aside)
        target.rename(aside)  # kept for inspection, never read by the round
        raise FacilityRefused(f"outputs refused: {error} (set aside in {aside})") from None
    result = {"transfer": report, "metrics": metrics, "path": str(target)}
    write_step(sealed, facility, "pull", result)
    log.info(
        "%s: pulled %s in %.2f s; val loss %s -> %s on %s samples",
        facility, target, report["seconds"], metrics.get("val_loss_before"), metrics.get("val_loss_after"),
        metrics.get("num_samples"),
    )  # fmt: skip
    return result


def record_failure(sealed: SealedPlan, facility: str, task_id: str, try_number: int, error: Any, *, refused: bool) -> None:
    """Keeps why a facility missed the round, for the aggregation task and the manifest."""
    path = sealed.layout.failure_record(sealed.round, facility)
    path.parent.mkdir(parents=True, exist_ok=True)
    from xffl_airflow.secrets_scrub import scrub_env

    write_json_atomic(path, {"facility": facility, "task_id": task_id, "try_number": try_number,
                             "error": scrub_env(str(error))[-4000:], "refused": refused,
                             "plan_sha256": sealed.sha256, "at": now()})  # fmt: skip
