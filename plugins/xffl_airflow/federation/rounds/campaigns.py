"""A federation's campaigns in its storage: who owns each, which to warm-start from, which is
still running, and what the rounds so far decided.

A campaign belongs to the federation DAG that made it: its first ``prepare`` writes
``<campaign>/campaign.json`` (the DAG id and the federation's identity; created whole or not at
all, never overwritten), and every manifest records the DAG id too. A run of another DAG that
names the campaign is refused before anything is read or written, and only campaigns a DAG owns
are its warm-start sources. Campaigns from before owner records are owned by the DAG their
manifests record.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xffl_airflow.federation.convergence import RoundOutcome
from xffl_airflow.federation.errors import CampaignOwnedError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.names import FederationDag, in_namespace, run_id
from xffl_tasks.manifest import MANIFEST, read_manifest, round_dirs, sha256_file

log = logging.getLogger(__name__)


def campaign_owner(campaign_dir: Path) -> str | None:
    """The DAG id that owns the campaign: its owner record's, else the first manifest's."""
    record = read_manifest(Path(campaign_dir) / "campaign.json")
    if record is not None and isinstance(record.get("dag_id"), str):
        return record["dag_id"]
    if not Path(campaign_dir).is_dir():
        return None
    for _, folder in round_dirs(campaign_dir):
        manifest = read_manifest(folder / MANIFEST)
        if manifest is not None and isinstance(manifest.get("dag_id"), str):
            return manifest["dag_id"]
    return None


def check_owner(dag: FederationDag, layout: CampaignLayout) -> None:
    """Refuses a campaign that another DAG owns (nothing is read or written of it)."""
    owner = campaign_owner(layout.campaign_dir)
    if owner is not None and owner != dag.dag_id:
        raise CampaignOwnedError(
            f"campaign {layout.campaign} in {layout.storage} belongs to DAG {owner}, not {dag.dag_id}: a "
            "run may continue only its own DAG's campaigns; name another campaign (nothing was pushed "
            "or written)"
        )


def claim_campaign(dag: FederationDag, layout: CampaignLayout, *, run: str) -> None:
    """Makes ``dag`` the campaign's owner unless it has one (then it must be ``dag``)."""
    check_owner(dag, layout)
    path = layout.owner_record
    if path.is_file():
        return
    layout.campaign_dir.mkdir(parents=True, exist_ok=True)
    record = {**dag.identity(), "created_by_run": run}
    fd, tmp = tempfile.mkstemp(prefix=".campaign.json.", dir=layout.campaign_dir)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(record, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)  # whole, and only if absent: two claims never overwrite each other
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)
    check_owner(dag, layout)  # a claim made meanwhile by another DAG wins; this one is refused
    log.info("campaign %s belongs to DAG %s (%s)", layout.campaign, dag.dag_id, path)


def own_campaigns(dag: FederationDag, *, exclude: str) -> list[Path]:
    """The DAG's campaign folders in its namespace (its own campaign and its scheduled ones)
    that it owns, but ``exclude``."""
    storage = Path(dag.storage)
    if not storage.is_dir():
        return []
    found = []
    for folder in sorted(storage.iterdir()):
        if folder.name == exclude or not folder.is_dir() or not in_namespace(folder.name, dag.campaign):
            continue
        owner = campaign_owner(folder)
        if owner == dag.dag_id:
            found.append(folder)
        elif owner is not None:
            log.info("campaign %s is in this DAG's namespace but belongs to %s: not a source", folder.name, owner)
    return found


def warm_start_source(dag: FederationDag, *, exclude: str, unfinished: bool, marker: str) -> dict[str, Any] | None:
    """Where a warm-started campaign starts: the newest campaign of this DAG that finished by its
    own convergence rule (its last round's manifest says stop), its final global model.

    A campaign that failed or was abandoned (its last round has no manifest, or its manifest
    says go on) is a source only with ``unfinished``: then its newest round that has a manifest.
    Its global folder must hold ``marker`` (``config.json``, or ``adapter_config.json`` for LoRA).
    Returns the source's ``campaign``, ``round``, ``model``, ``manifest``, ``manifest_sha256`` and
    ``finished``, or None.
    """
    best: tuple[str, dict[str, Any]] | None = None
    for campaign_dir in own_campaigns(dag, exclude=exclude):
        finished = False
        for position, (number, folder) in enumerate(reversed(round_dirs(campaign_dir))):
            manifest = read_manifest(folder / MANIFEST)
            if manifest is None:
                continue
            finished = position == 0 and bool((manifest.get("decision") or {}).get("stop"))
            break
        else:
            continue
        if not finished and not unfinished:
            continue
        if not (folder / "global" / marker).is_file():
            continue
        stamp = str(manifest.get("finished_at") or "")
        source = {"campaign": campaign_dir.name, "round": number, "model": str(folder / "global"),
                  "manifest": str(folder / MANIFEST), "finished": finished}  # fmt: skip
        if best is None or stamp > best[0]:
            best = (stamp, source)
    if best is None:
        return None
    source = best[1]
    source["manifest_sha256"] = sha256_file(source["manifest"])
    return source


def campaign_in_flight(
    dag: FederationDag, *, exclude: str, active: Callable[[list[str]], int]
) -> tuple[str, str] | None:
    """Another campaign of this DAG whose next round is queued or running: ``(campaign, run
    id)``, else None. ``active(run_ids)`` counts those runs that are queued or running.

    A campaign is in flight when its last round has no manifest yet (that round's run), or its
    last manifest says go on (the next round's run); a run that failed or never existed is not
    active, so a failed campaign never holds the next one back.
    """
    candidates: list[tuple[str, str]] = []
    for campaign_dir in own_campaigns(dag, exclude=exclude):
        rounds = round_dirs(campaign_dir)
        if not rounds:
            continue
        number, folder = rounds[-1]
        manifest = read_manifest(folder / MANIFEST)
        if manifest is None:
            candidates.append((campaign_dir.name, run_id(campaign_dir.name, number)))
        elif not (manifest.get("decision") or {}).get("stop"):
            following = manifest.get("next_run_id")
            candidates.append((campaign_dir.name, str(following or run_id(campaign_dir.name, number + 1))))
    if not candidates or not active([rid for _, rid in candidates]):
        return None
    return next(((name, rid) for name, rid in candidates if active([rid])), None)


def history(layout: CampaignLayout, before_round: int) -> list[RoundOutcome]:
    """What the campaign's rounds before ``before_round`` contribute to the convergence rules."""
    outcomes = []
    for number, folder in round_dirs(layout.campaign_dir):
        manifest = read_manifest(folder / MANIFEST) if number < before_round else None
        if manifest is None:
            continue
        outcomes.append(
            RoundOutcome(number, manifest.get("weighted_val_loss"), (manifest.get("aggregation") or {}).get("global_update_norm"))
        )
    return outcomes
