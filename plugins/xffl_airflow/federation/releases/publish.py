"""Publishing a campaign's release: an immutable folder, a model card, a chained record, an
Asset event (docs/release.md).

Runs only when the decision in storage says release and, when the plan asks for approval, a
person approved it (recorded in storage by the approval task). The best round's global model
goes to ``<releases root>/<federation>/<n>/`` (``xffl_tasks.release.publish``: written aside,
renamed, read-only; a LoRA adapter is merged into the base model, the adapter kept beside it)
with the model card (``README.md``) and ``release.json`` (every file's sha256, the link to the
campaign's final manifest and to the previous release, the selection, the comparison and the
approval). The federation's release Asset gets an event naming the release and the sha256 of
its ``release.json``, which a consumer verifies (``assets.verify_release_event``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.releases.approval import APPROVAL_FILE
from xffl_airflow.federation.releases.select import decision
from xffl_airflow.federation.releases.store import SealedRelease
from xffl_tasks.manifest import read_manifest, sha256_file

log = logging.getLogger(__name__)


def _approval(sealed: SealedRelease) -> dict[str, Any] | None:
    """The person's approval recorded under this plan; a ``RoundError`` if the plan asks for one
    and there is none (the approval task decides, never XCom)."""
    if not sealed.plan.approval:
        return None
    record = read_manifest(sealed.layout.folder / APPROVAL_FILE)
    if record is None or record.get("plan_sha256") != sealed.sha256 or record.get("approved") is not True:
        raise RoundError(f"{sealed.where()}: the plan asks for a person's approval and none is recorded: nothing released")
    return {k: record.get(k) for k in ("responded_by", "responded_at", "chosen_options")}


def publish_step(sealed: SealedRelease) -> dict[str, Any]:
    from xffl_tasks.release.best import Selection
    from xffl_tasks.release.card import render_card
    from xffl_tasks.release.chain import read_campaign
    from xffl_tasks.release.compare import ReleaseComparison
    from xffl_tasks.release.errors import ReleaseError
    from xffl_tasks.release.publish import publish_release

    plan = sealed.plan
    decided = decision(sealed)
    if not decided.get("release"):
        raise RoundError(f"{sealed.where()}: the decision says nothing is released: {decided.get('reason')}")
    approval = _approval(sealed)
    campaign_dir = sealed.layout.folder.parent
    chain = read_campaign(campaign_dir, through_round=plan.final_round)
    try:
        selection = Selection.from_dict(decided["selection"])
        comparison = ReleaseComparison.from_dict(decided["comparison"])
        inputs = chain.manifests[0].get("inputs") or {}
        card = render_card(
            federation=plan.federation_name, manifests=chain.manifests, final_manifest_sha256=chain.final_sha256,
            selection=selection, base_model=str(inputs.get("base_model") or inputs.get("model") or "-"),
            facilities={f.name: f.description for f in plan.facilities}, comparison=comparison,
            strategy=plan.strategy, title=plan.description or None,
        )  # fmt: skip
        chosen = campaign_dir / f"round-{selection.round:04d}" / "global"
        stacked = plan.model_kind == "stacked"  # the round's merged base is the model
        folder = publish_release(
            plan.releases_root, plan.federation_name, chosen / "base" if stacked else chosen,
            campaign_dir=campaign_dir, selection=selection, card_text=card,
            model_subfolder="base" if stacked else None,
            record={"comparison": comparison.to_dict(), "approval": approval, "release_plan_sha256": sealed.sha256,
                    "decided": decided.get("reason")},
            base_model_dir=plan.base_model if plan.model_kind == "lora" else None,
        )  # fmt: skip
    except ReleaseError as error:
        raise RoundError(f"{sealed.where()}: {error}") from error
    digest = sha256_file(Path(folder) / "release.json")
    log.info("campaign %s: round %d's model released as %s (release.json sha256 %s)", plan.campaign,
             selection.round, folder, digest)  # fmt: skip
    return {"federation": plan.federation_name, "number": int(Path(folder).name), "path": str(folder),
            "release_json_sha256": digest, "campaign": plan.campaign, "round": selection.round}  # fmt: skip
