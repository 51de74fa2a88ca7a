"""Choosing what a campaign releases, and whether: the best round, and the comparison with the
federation's last release on the same facilities' validation data.

From the evaluations the facilities sent back under the sealed release plan: the last global
model's loss (weighted by the last round's aggregation weights, as every round's
``weighted_val_loss``), hence the best of the campaign's global models over its chain
(``xffl_tasks.release.best``); and the last release's loss with the same weights. The best model
is released when it improves on the last release by the plan's margin (the first release needs
no margin). ``selection.json`` records the choice, the comparison and the decision; the run's
log says why, whichever way it goes.
"""

from __future__ import annotations

import logging
from typing import Any

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.releases.plan import LAST, RELEASE
from xffl_airflow.federation.releases.store import SealedRelease, step_result
from xffl_airflow.federation.sealing import now
from xffl_tasks.manifest import read_manifest, write_json_atomic

log = logging.getLogger(__name__)


def _evaluations(sealed: SealedRelease) -> dict[str, Any]:
    """The facilities' checked evaluations that the pulls recorded under this plan."""
    from xffl_tasks.evaluate.result import CandidateEvaluation, FacilityEvaluation

    found = {}
    for name in sealed.plan.facility_names:
        pulled = step_result(sealed, name, "pull")
        if pulled is None:
            continue
        candidates = {key: CandidateEvaluation(key, float(v["val_loss"]), int(v["val_tokens"]), int(v["val_sequences"]))
                      for key, v in pulled["candidates"].items()}  # fmt: skip
        found[name] = FacilityEvaluation(name, candidates, 0, 0)
    return found


def select_step(sealed: SealedRelease) -> dict[str, Any]:
    """Chooses the best round, compares it with the last release, decides; ``selection.json``."""
    from xffl_tasks.release.best import choose_best_round, final_evaluation
    from xffl_tasks.release.chain import read_campaign
    from xffl_tasks.release.compare import compare_to_release
    from xffl_tasks.release.errors import ReleaseError

    plan = sealed.plan
    evaluations = _evaluations(sealed)
    missing = [n for n in plan.facility_names if n not in evaluations]
    if len(evaluations) < plan.quorum:
        raise RoundError(f"{sealed.where()}: {len(evaluations)} of {len(plan.facilities)} facilities evaluated "
                         f"(missing: {', '.join(missing)}); the campaign's quorum is {plan.quorum}")  # fmt: skip
    chain = read_campaign(sealed.layout.folder.parent, through_round=plan.final_round)
    weights = chain.manifests[-1].get("weights") or {}
    try:
        final = final_evaluation(evaluations, weights, LAST)
        selection = choose_best_round(chain.manifests, final)
        previous = plan.previous_release
        release_loss = final_evaluation(evaluations, weights, RELEASE).weighted_val_loss if previous else None
        comparison = compare_to_release(selection.loss, release_loss, margin=plan.min_improvement,
                                        previous_release=previous.number if previous else None)  # fmt: skip
    except ReleaseError as error:
        raise RoundError(f"{sealed.where()}: {error}") from error
    reason = (f"round {selection.round}'s global model (loss {selection.loss:.6f}): {comparison.reason}: "
              + ("released" + (" once a person approves it" if plan.approval else "") if comparison.passes
                 else "nothing is released"))  # fmt: skip
    record = {
        "format": "xffl-release-decision", "version": 1, "campaign": plan.campaign, "plan_sha256": sealed.sha256,
        "selection": selection.to_dict(), "comparison": comparison.to_dict(),
        "release_evaluation": final_evaluation(evaluations, weights, RELEASE).to_dict() if previous else None,
        "missing": missing, "release": comparison.passes, "reason": reason, "decided_at": now(),
    }  # fmt: skip
    write_json_atomic(sealed.layout.selection, record)
    (log.info if comparison.passes else log.warning)("campaign %s: %s", plan.campaign, reason)
    return record


def decision(sealed: SealedRelease) -> dict[str, Any]:
    """The decision ``select_step`` recorded under this plan; a ``RoundError`` when there is none."""
    record = read_manifest(sealed.layout.selection)
    if record is None or record.get("plan_sha256") != sealed.sha256:
        raise RoundError(f"{sealed.where()}: no decision under this release plan; select has not succeeded")
    return record
