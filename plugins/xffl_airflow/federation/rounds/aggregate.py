"""The round's aggregation: the facilities that delivered under the round's plan, if they are
enough for its quorum, into the next global model.

Who delivered is read from the round's storage (each pull's record under this plan), never
from XCom; the clients' folders are the layout's (``round-NNNN/clients/<facility>``), their
hashes those the pulls verified. The strategy, its options, the weight cap and the quorum are
the plan's. A facility that is missing is named with its reason (its failure record, a step that
ran under another plan, or its tasks that did not finish).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.rounds.cleanup import remove_leftovers
from xffl_airflow.federation.rounds.store import (
    SealedPlan,
    step_problem,
    step_result,
    write_aggregate_record,
)
from xffl_tasks.manifest import read_manifest

log = logging.getLogger(__name__)


def missing_reason(sealed: SealedPlan, facility: str) -> str:
    """Why ``facility`` delivered nothing this round under this plan."""
    if sealed.plan.facility(facility).excluded:
        return sealed.plan.facility(facility).excluded
    record = read_manifest(sealed.layout.failure_record(sealed.round, facility))
    if record is not None and record.get("plan_sha256") in (sealed.sha256, None):
        if record.get("refused"):
            return f"rejected: {record.get('error')}"
        return f"{record.get('task_id')} failed after {record.get('try_number')} attempt(s): {record.get('error')}"
    problem = step_problem(sealed, facility, "pull")
    return problem or "its tasks did not finish"


def delivered(sealed: SealedPlan) -> dict[str, dict[str, Any]]:
    """The facilities whose pull succeeded under this plan, with their pull's result."""
    found = {}
    for name in sealed.plan.facility_names:
        result = step_result(sealed, name, "pull")
        if result is not None:
            found[name] = result
    return found


def pulled_hashes(sealed: SealedPlan, pulled: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sha256 the pulls verified, with each file's size and mtime then, by local path: the
    aggregation takes them instead of reading the files again (a file changed since is hashed)."""
    given: dict[str, dict[str, Any]] = {}
    for name, result in pulled.items():
        folder = sealed.layout.client_dir(sealed.round, name)
        transfer = result.get("transfer") or {}
        stats = transfer.get("file_stats") or {}
        for relative, digest in (transfer.get("files") or {}).items():
            stat = stats.get(relative)
            if isinstance(stat, dict) and isinstance(digest, str):
                given[str(folder / relative)] = {"sha256": digest, **stat}
    return given


def aggregate_step(sealed: SealedPlan) -> dict[str, Any]:
    """Aggregates the facilities that delivered a model under the plan, if they are enough."""
    plan, layout = sealed.plan, sealed.layout
    pulled = delivered(sealed)
    participants = sorted(pulled)
    missing = {name: missing_reason(sealed, name) for name in plan.facility_names if name not in pulled}
    for name, reason in missing.items():
        log.warning("%s missed round %d: %s", name, plan.round, reason)
    if len(participants) < plan.quorum:
        raise RoundError(
            f"campaign {plan.campaign} round {plan.round}: {len(participants)} of {len(plan.facilities)} "
            f"facilities delivered a model, quorum is {plan.quorum}; missing: "
            + "; ".join(f"{k}: {v}" for k, v in missing.items())
        )
    from xffl_tasks.aggregate import aggregate
    from xffl_tasks.aggregate.errors import AggregationError

    out = layout.global_model(plan.round)
    if out.exists():  # a retry after an earlier attempt got this far: redo it from the inputs
        aside = out.with_name(f"global.stale-{int(time.time())}")
        out.rename(aside)
        shutil.rmtree(aside)
    # an attempt killed while aggregating (SIGKILL, the node lost) could not remove its staging
    # folder (xffl_tasks.aggregate.staging: ".global.partial-*"); one attempt runs at a time
    remove_leftovers([*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob("global.stale-*")])
    weights = None
    if any(plan.facility(n).weight is not None for n in participants):
        weights = [float(plan.facility(n).weight or 0) for n in participants]
    started = time.monotonic()
    try:
        report = aggregate(
            Path(plan.input_model),
            [layout.client_dir(plan.round, n) for n in participants],
            out,
            strategy=plan.strategy,
            weights=weights,
            names=participants,
            options=dict(plan.strategy_options) or None,
            min_clients=plan.quorum,
            max_weight_share=plan.max_weight_share,
            input_hashes=pulled_hashes(sealed, pulled),
            max_samples=[plan.facility(n).max_samples for n in participants],
            norm_bound=plan.norm_bound,
            norm_bound_action=plan.norm_bound_action,
        )
    except AggregationError as error:  # bad input does not pass on a retry
        raise RoundError(
            f"campaign {plan.campaign} round {plan.round}: the aggregation refused its input "
            f"(quorum {plan.quorum}): {error}"
        ) from error
    rejected = {name: f"rejected by the aggregation: {reason}" for name, reason in report.get("rejected", {}).items()}
    for name, reason in rejected.items():
        log.warning("%s is left out of round %d: %s", name, plan.round, reason)
    missing.update(rejected)
    rejected.update({name: reason for name, reason in missing.items() if reason.startswith("rejected")})
    participants = [name for name in participants if name not in rejected]
    log.info(
        "aggregated %d facilities with %s in %.2f s; global update norm %s",
        len(participants), plan.strategy, time.monotonic() - started, report.get("global_update_norm"),
    )  # fmt: skip
    result = {"participants": participants, "missing": missing, "rejected": rejected, "path": str(out),
              "report": report}  # fmt: skip
    write_aggregate_record(sealed, result)
    return result
