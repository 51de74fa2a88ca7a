"""The release run's first step: check the campaign ended, find what it must beat, seal the plan.

``prepare_release`` refuses, before anything is pushed: a campaign name that is not one, a
campaign another DAG owns, a campaign whose last manifest does not say stop, a config without a
``release`` section. It reads the campaign's last round's sealed plan (its facilities, their
connections and how they run our Python, the training hyperparameters: the rounds' own data,
seed and metrics) and the config's ``release`` settings, finds the federation's newest release,
and seals the release plan into ``<campaign>/release/plan.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from xffl_airflow.federation.config import load_config
from xffl_airflow.federation.errors import ConfigError, RoundError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.names import FederationDag, check_campaign, release_dag_id
from xffl_airflow.federation.releases.plan import (
    EvaluationFacility,
    PreviousRelease,
    ReleasePlan,
    evaluation_command,
    release_folders,
)
from xffl_airflow.federation.releases.store import SealedRelease, seal_release
from xffl_airflow.federation.rounds import campaigns
from xffl_airflow.federation.rounds.prepare import model_view, pushed_files
from xffl_airflow.federation.rounds.store import load_plan
from xffl_airflow.federation.sealing import now
from xffl_tasks.manifest import MANIFEST, read_manifest, round_dirs, sha256_file

log = logging.getLogger(__name__)


def latest_release(root: Path, federation: str) -> PreviousRelease | None:
    """The federation's newest release (the highest number whose release.json reads)."""
    from xffl_tasks.release.publish import release_numbers

    folder = Path(root) / federation
    if not folder.is_dir():
        return None
    for number in sorted(release_numbers(folder), reverse=True):
        record = read_manifest(folder / str(number) / "release.json")
        files = (record or {}).get("files")
        if record is None or not isinstance(files, dict):
            log.warning("release %s/%d has no readable release.json: skipped", folder, number)
            continue
        model = {k.removeprefix("model/"): v for k, v in files.items() if k.startswith("model/")}
        return PreviousRelease(number=number, folder=str(folder / str(number)), model=str(folder / str(number) / "model"),
                               release_json_sha256=sha256_file(folder / str(number) / "release.json"),
                               model_sha256=pushed_files(model))  # fmt: skip
    return None


def _final_round(layout: CampaignLayout) -> tuple[int, dict[str, Any]]:
    rounds = round_dirs(layout.campaign_dir) if layout.campaign_dir.is_dir() else []
    if not rounds:
        raise RoundError(f"campaign {layout.campaign}: no rounds in {layout.storage}")
    number, folder = rounds[-1]
    manifest = read_manifest(folder / MANIFEST)
    if manifest is None or not (manifest.get("decision") or {}).get("stop"):
        raise RoundError(
            f"campaign {layout.campaign}: its last round ({number}) has not ended the campaign (no manifest "
            "saying stop); a release runs once the convergence rule stops it"
        )
    return number, manifest


def _outputs(manifest: dict[str, Any], prefix: str) -> dict[str, str]:
    outputs = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
    return pushed_files({k.removeprefix(prefix): v for k, v in outputs.items() if k.startswith(prefix)})


def prepare_release(*, dag: FederationDag, run_conf: dict[str, Any], run: str) -> SealedRelease:
    campaign = check_campaign(run_conf.get("campaign"), "params.campaign")
    layout = CampaignLayout(dag.storage, campaign)
    campaigns.check_owner(dag, layout)
    if campaigns.campaign_owner(layout.campaign_dir) != dag.dag_id:
        raise RoundError(f"campaign {campaign} is not a campaign of {dag.dag_id} in {dag.storage}")
    final_round, manifest = _final_round(layout)
    rounds = load_plan(dag, campaign, final_round).plan
    config = load_config(dag.config_path)
    if config.release is None:
        raise ConfigError(f"{dag.config_path}: release: the config has no release section; nothing to release")
    kind = "model" if rounds.peft is None else ("stacked" if rounds.strategy == "lora-stacked" else "lora")
    final = layout.global_model(final_round)
    last_model = final / "base" if kind == "stacked" else final
    last_sha256 = _outputs(manifest, "global/base/" if kind == "stacked" else "global/")
    previous = latest_release(Path(config.releases_root), config.campaign)
    release_folder = layout.campaign_dir / "release"
    release_folder.mkdir(parents=True, exist_ok=True)
    model_view(last_model, release_folder / "last")  # what the facilities receive
    if previous is not None:
        model_view(Path(previous.model), release_folder / "previous")
    descriptions = {f.name: f.description for f in config.facilities}
    facilities = []
    for entry in rounds.facilities:
        folders = release_folders(dag.dag_id, campaign)
        base = entry.remote_base if kind == "lora" else None
        outputs = (folders["evaluation"], folders["evaluation_release"]) if base and previous else (folders["evaluation"],)
        remote_release = folders["release"] if previous is not None else None
        facilities.append(EvaluationFacility(
            name=entry.name, conn_id=entry.conn_id, login=entry.login, workdir=entry.workdir,
            jobs_dir=f"{entry.workdir}/{folders['jobs']}", remote_last=folders["last"], remote_release=remote_release,
            remote_outputs=outputs, sbatch=entry.sbatch, description=descriptions.get(entry.name, ""),
            command=evaluation_command(entry, hyperparameters=rounds.hyperparameters, remote_last=folders["last"],
                                       remote_release=remote_release, base=base, outputs=outputs),
        ))  # fmt: skip
    plan = ReleasePlan(
        dag_id=release_dag_id(dag.campaign), federation_dag_id=dag.dag_id, federation=dag.identity(),
        federation_name=config.campaign, campaign=campaign, final_round=final_round,
        final_manifest=str(layout.manifest(final_round)), final_manifest_sha256=sha256_file(layout.manifest(final_round)),
        model_kind=kind, last_model=str(last_model), last_model_sha256=last_sha256,
        base_model=rounds.peft.base_model if kind == "lora" else None, strategy=rounds.strategy,
        previous_release=previous, releases_root=config.releases_root,
        min_improvement=config.release.min_improvement, approval=config.release.approval,
        approval_timeout_h=config.release.approval_timeout_h, quorum=rounds.quorum,
        description=config.description, facilities=tuple(facilities), sealed_at=now(),
    )  # fmt: skip
    sealed = seal_release(plan, dag.storage)
    log.info(
        "campaign %s ended after round %d: evaluating its last global model%s at %s (release plan %s)",
        campaign, final_round, f" and release {previous.number}" if previous else "", ", ".join(plan.facility_names),
        sealed.sha256,
    )  # fmt: skip
    return sealed
