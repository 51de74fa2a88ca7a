"""The round's first step: check the run, resolve the input model, seal the round's plan.

``prepare_round`` reads the DAG's config file (the one its build fixed) with the run's
validated knobs merged in, and refuses, before anything is written: a run conf that asks for
what the config did not open, a config whose facilities, campaign or storage changed since the
DAG was built, a campaign that another DAG owns, a round that cannot run again. Then it claims
the campaign for this DAG, resolves the model the round starts from (the base model, a
warm-start source or the previous round's global model) with the sha256 of each of its files,
and seals the plan into ``round-NNNN/plan.json``. Nothing later reads the config file.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xffl_airflow.federation.config import ConfigError, config_sha256, load_config
from xffl_airflow.federation.connections import check_connections
from xffl_airflow.federation.errors import PlanError, RoundError, RunConfError
from xffl_airflow.federation.knobs import accept_run_conf
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.names import (
    FederationDag,
    campaign_for_run,
    check_campaign,
    check_round,
    dag_id_for,
)
from xffl_airflow.federation.rounds import campaigns
from xffl_airflow.federation.rounds.plan import RoundPlan, build_round_plan
from xffl_airflow.federation.rounds.store import SealedPlan, now, seal_plan
from xffl_tasks.manifest import read_manifest, round_dirs, sha256_file

log = logging.getLogger(__name__)

# What a global model folder holds besides the model: the aggregation's report and the server
# optimiser's state stay on the Airflow side (the state is 2-4 times the model's size).
NOT_PUSHED = frozenset({"aggregation.json", "server_state"})


def model_view(model: Path, view: Path) -> Path:
    """A folder of symlinks to the model's own files (what the facilities receive)."""
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in sorted(model.iterdir()):
        if entry.name not in NOT_PUSHED and not entry.name.startswith("."):
            (view / entry.name).symlink_to(entry.resolve())
    return view


def pushed_files(hashes: dict[str, str]) -> dict[str, str]:
    """Of a model folder's file hashes, those of the files the facilities receive."""
    return {
        name: digest for name, digest in hashes.items()
        if name.split("/", 1)[0] not in NOT_PUSHED and not name.startswith(".")
    }  # fmt: skip


def _global_hashes(manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """The recorded sha256 of a round's global model files (its manifest's ``outputs``)."""
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return None
    return pushed_files({k.removeprefix("global/"): v for k, v in outputs.items() if k.startswith("global/")})


def initial_adapter_for(config: Any, layout: CampaignLayout) -> Path:
    """The campaign's first global adapter (A from the training seed, B zero), made once."""
    from xffl_tasks.adapter import LoraSettings, initial_adapter

    folder = layout.campaign_dir / "initial-adapter"
    if not (folder / "adapter_config.json").is_file():
        peft = config.training.peft
        settings = LoraSettings(r=peft.r, alpha=peft.alpha, dropout=peft.dropout, target_modules=tuple(peft.target_modules))
        initial_adapter(Path(config.base_model), folder, settings, seed=int(config.training.hyperparameters.get("seed", 0)))
    return folder


def _accept_run(dag: FederationDag, run_conf: dict[str, Any]):
    """The config (the run's knobs merged in), the overrides, the round and the requested
    campaign; every refusal of the run at once, each naming its field."""
    base = load_config(dag.config_path)
    refusals: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except RunConfError as error:
            refusals.append(str(error))
            return None

    overrides = attempt(accept_run_conf, run_conf, base.knobs, base.knob_defaults()) or {}
    round_number = attempt(check_round, run_conf.get("round", 0))
    campaign = run_conf.get("campaign") or None
    if campaign is not None:
        attempt(check_campaign, campaign, "params.campaign")
    if refusals:
        raise RunConfError("\n".join(refusals))
    config = load_config(dag.config_path, overrides) if overrides else base
    if overrides:
        log.info("this run changes %s", ", ".join(f"{s}.{k}={v!r}" for s, d in overrides.items() for k, v in d.items()))
    return config, overrides, round_number, campaign


def _check_same_dag(config: Any, dag: FederationDag, dag_facilities: list[str]) -> None:
    """The config still describes the DAG that was built from it."""
    names = [f.name for f in config.facilities]
    changed = []
    if names != list(dag_facilities):
        changed.append(f"facilities {names} differ from the DAG's {list(dag_facilities)}")
    if dag_id_for(config.campaign) != dag.dag_id:
        changed.append(f"campaign {config.campaign} would be DAG {dag_id_for(config.campaign)}, not {dag.dag_id}")
    if Path(config.storage) != Path(dag.storage):
        changed.append(f"storage {config.storage} differs from the DAG's {dag.storage}")
    if changed:
        raise ConfigError(
            f"{dag.config_path}: {'; '.join(changed)}; a run can change settings, not what the DAG is "
            "(let the DAG reload after editing the config)"
        )


def _input_model(config: Any, dag: FederationDag, layout: CampaignLayout, round_number: int):
    """The model the round starts from, the sha256 of its files, and the warm-start source."""
    peft = config.training.peft is not None
    warm = None
    hashes = None
    if round_number == 0:
        input_model = Path(config.base_model)
        if peft:
            input_model = initial_adapter_for(config, layout)
        if config.warm_start:
            warm = campaigns.warm_start_source(dag, exclude=layout.campaign, unfinished=config.warm_start_unfinished,
                                               marker=warm_marker(config))  # fmt: skip
            if warm:
                input_model = Path(warm["model"])
                hashes = _global_hashes(read_manifest(warm["manifest"]))
                log.info(
                    "warm start from campaign %s round %d (%s; manifest %s, sha256 %s)", warm["campaign"],
                    warm["round"], "finished" if warm["finished"] else "unfinished", warm["manifest"],
                    warm["manifest_sha256"],
                )  # fmt: skip
            else:
                log.info("warm start: no finished campaign of this DAG yet; starting from the base model")
    else:
        input_model = layout.global_model(round_number - 1)
        manifest = read_manifest(layout.manifest(round_number - 1))
        if manifest is None:
            raise RoundError(f"campaign {layout.campaign}: round {round_number - 1} has no manifest; it did not finish")
        hashes = _global_hashes(manifest)
    marker = "adapter_config.json" if peft else "config.json"
    if not (input_model / marker).is_file():
        kind = "an adapter folder" if peft else "a model folder"
        raise RoundError(f"campaign {layout.campaign} round {round_number}: input model {input_model} is not {kind}")
    return input_model, hashes, warm


def view_hashes(view: Path) -> dict[str, str]:
    """The sha256 of every file a push of ``view`` sends (links followed, as the push does)."""
    from xffl_airflow.transfer.local import scan_folder

    return {file.relative: sha256_file(file.path) for file in scan_folder(view)}


def _base_model_hashes(config: Any, layout: CampaignLayout, round_number: int) -> dict[str, str] | None:
    """(LoRA) the base model's file hashes: the previous round's plan's, else computed."""
    if config.training.peft is None:
        return None
    if round_number > 0:
        try:
            previous = RoundPlan.from_json(layout.plan(round_number - 1).read_text(), source="previous plan")
        except (OSError, UnicodeDecodeError, PlanError):
            previous = None
        if previous is not None and previous.peft is not None and previous.peft.base_model == config.base_model:
            return dict(previous.peft.base_model_sha256)
    return view_hashes(layout.pushed_base(round_number))


def prepare_round(
    *,
    dag: FederationDag,
    dag_facilities: list[str],
    run_conf: dict[str, Any],
    run_type: str,
    run: str,
    logical_date: Any = None,
    active_runs: Callable[[list[str]], int] | None = None,
) -> SealedPlan | None:
    """Checks the run, claims the campaign, seals the round's plan; the sealed plan.

    Round 0 of a new campaign while another campaign of this DAG is in flight (its next round
    queued or running; ``active_runs`` counts such runs) returns None, saying why: the run is
    skipped, so two campaigns never interleave round by round.
    """
    config, overrides, round_number, requested = _accept_run(dag, run_conf)
    _check_same_dag(config, dag, dag_facilities)
    check_connections(config)
    name = campaign_for_run(dag.campaign, requested=requested, run_type=run_type, logical_date=logical_date)
    layout = CampaignLayout(Path(config.storage), name)
    campaigns.check_owner(dag, layout)  # before anything is read or written of it
    later = [n for n, _ in round_dirs(layout.campaign_dir)] if layout.campaign_dir.is_dir() else []
    if any(n > round_number for n in later):
        raise RoundError(
            f"campaign {name}: round {round_number} cannot run again, later rounds exist ({max(later)}); "
            "start a new campaign instead"
        )
    if round_number == 0 and active_runs is not None and not later:
        busy = campaigns.campaign_in_flight(dag, exclude=name, active=active_runs)
        if busy:
            log.warning(
                "skipping this run: campaign %s of this DAG is still running (its run %s is queued or "
                "running); campaign %s would interleave with it round by round. Trigger it again when %s ends.",
                busy[0], busy[1], name, busy[0],
            )  # fmt: skip
            return None
    excluded = _privacy_exclusions(config, dag, layout, round_number)  # before anything is written
    campaigns.claim_campaign(dag, layout, run=run)
    layout.round_dir(round_number).mkdir(parents=True, exist_ok=True)
    if config.aggregation.strategy == "lora-stacked":
        planned = _stacked(config, dag, layout, round_number)
    else:
        input_model, input_hashes, warm = _input_model(config, dag, layout, round_number)
        view = model_view(input_model, layout.pushed_model(round_number))
        if input_hashes is None:  # the base model or a new adapter: hashed once, here
            input_hashes = view_hashes(view)
        base_hashes = None
        if config.training.peft is not None:  # pushed once per facility, kept there across rounds
            model_view(Path(config.base_model), layout.pushed_base(round_number))
            base_hashes = _base_model_hashes(config, layout, round_number)
        planned = {"input_model": str(input_model), "input_model_sha256": input_hashes, "warm_start": warm,
                   "base_model_sha256": base_hashes}  # fmt: skip
    planned["excluded"] = excluded
    plan = build_round_plan(
        config,
        dag_id=dag.dag_id,
        federation=dag.identity(),
        config_path=dag.config_path,
        config_sha256=config_sha256(config),
        overrides=overrides,
        campaign=name,
        round_number=round_number,
        sealed_at=now(),
        **planned,
    )
    sealed = seal_plan(plan)
    log.info(
        "campaign %s round %d: %d facilities (%s), quorum %d, input model %s",
        name, round_number, len(plan.facilities), ", ".join(plan.facility_names), plan.quorum, plan.input_model,
    )  # fmt: skip
    return sealed


def warm_marker(config: Any) -> str:
    """The file a warm-start source's global folder must hold for this config's rounds."""
    if config.training.peft is None:
        return "config.json"
    return "base_hashes.json" if config.aggregation.strategy == "lora-stacked" else "adapter_config.json"


def _privacy_exclusions(config: Any, dag: FederationDag, layout: CampaignLayout, round_number: int) -> dict[str, str]:
    """(privacy) the facilities whose next run would exceed their budget; a ``RoundError`` when
    too few are left for the quorum (the lineage of a warm start counts: the same data)."""
    if config.privacy is None:
        return {}
    from xffl_airflow.federation.rounds.privacy import exclusions, previous_ledger

    warm = None
    if round_number == 0 and config.warm_start:
        warm = campaigns.warm_start_source(dag, exclude=layout.campaign, unfinished=config.warm_start_unfinished,
                                           marker=warm_marker(config))  # fmt: skip
    excluded = exclusions(config, previous_ledger(layout, round_number, warm))
    for name, reason in excluded.items():
        log.warning("%s does not train this round: %s", name, reason)
    return excluded


def _stacked(config: Any, dag: FederationDag, layout: CampaignLayout, round_number: int) -> dict[str, Any]:
    """A lora-stacked round's inputs (``rounds.stacked``): the update to push (none in round 0),
    the base for facilities that receive it whole, who catches up, each adapter's size bound."""
    from xffl_airflow.federation.rounds.stacked import adapter_bytes, stacked_inputs

    warm = None
    if round_number == 0 and config.warm_start:
        warm = campaigns.warm_start_source(dag, exclude=layout.campaign, unfinished=config.warm_start_unfinished,
                                           marker=warm_marker(config))  # fmt: skip
    inputs = stacked_inputs(config, dag, layout, round_number, warm)
    if inputs.update is not None:
        model_view(inputs.update, layout.pushed_model(round_number))
    model_view(inputs.base, layout.pushed_base(round_number))
    if inputs.catch_up:
        log.warning("round %d: %s did not train in round %d: the canonical base is pushed to %s instead of the update",
                    round_number, ", ".join(sorted(inputs.catch_up)), round_number - 1,
                    "it" if len(inputs.catch_up) == 1 else "them")  # fmt: skip
    return {"input_model": str(inputs.input_model), "input_model_sha256": inputs.update_sha256, "warm_start": warm,
            "base_model": str(inputs.base),
            "base_model_sha256": inputs.base_sha256 or view_hashes(layout.pushed_base(round_number)),
            "catch_up": inputs.catch_up, "adapter_bytes": adapter_bytes(inputs.base, config)}  # fmt: skip


def shown(sealed: SealedPlan) -> dict[str, Any]:
    """What ``prepare`` returns to XCom: shown in the UI, never obeyed by a later task."""
    plan = sealed.plan
    return {
        "campaign": plan.campaign,
        "round": plan.round,
        "plan": str(sealed.path),
        "plan_sha256": sealed.sha256,
        "input_model": plan.input_model,
        "facilities": plan.facility_names,
        "quorum": plan.quorum,
        "strategy": plan.strategy,
    }
