"""What a round's Python tasks do: prepare, push, pull, aggregate, finalize.

The DAG file (``dags/xffl_federation.py``) only wires these functions into tasks. Each one
takes plain values (the round plan that ``prepare_round`` returns travels through XCom as a
JSON-safe dict) and logs what it does, so a round can be audited from its task logs.
Heavy imports (torch, the transfer engine) happen inside the functions: the DAG file stays
cheap to parse.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xffl_airflow.federation.config import ConfigError, FederationConfig, config_sha256, load_config
from xffl_airflow.federation.connections import check_connections
from xffl_airflow.federation.convergence import RoundOutcome, decide, weighted_loss
from xffl_airflow.federation.knobs import RunConfError, accept_run_conf, check_campaign
from xffl_airflow.federation.layout import CampaignLayout, RemoteLayout, run_id
from xffl_tasks.manifest import (
    MANIFEST,
    hash_tree,
    round_dirs,
    sha256_file,
    write_json_atomic,
    write_manifest,
)

log = logging.getLogger(__name__)


class RoundError(RuntimeError):
    """A round cannot go on; the message says which campaign, round and facility, and why."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- prepare -----------------------------------------------------------------------------

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



def campaign_name(config: FederationConfig, *, requested: str | None, run_type: str, logical_date: Any) -> str:
    """A scheduled run starts a campaign of its own, named after the config and the date.

    A requested name follows the config's ``campaign`` rule (it names folders on the worker
    and at every facility): ``../x`` or ``/etc`` is refused (docs/security.md, R2).
    """
    if requested:
        return check_campaign(requested, "params.campaign")
    if run_type == "scheduled" and logical_date is not None:
        stamp = logical_date.strftime("%Y%m%dt%H%M") if hasattr(logical_date, "strftime") else str(logical_date)
        return f"{config.campaign}-{stamp}"[:64]
    return config.campaign


def _config_campaigns(config: FederationConfig, *, exclude: str) -> list[Path]:
    """The campaign folders of this config (its own and its scheduled ones), but ``exclude``."""
    storage = Path(config.storage)
    if not storage.is_dir():
        return []
    return sorted(
        d for d in storage.iterdir()
        if d.name != exclude and d.is_dir()
        and (d.name == config.campaign or d.name.startswith(config.campaign + "-"))
    )  # fmt: skip


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def warm_start_source(config: FederationConfig, *, exclude: str) -> dict[str, Any] | None:
    """Where a warm-started campaign starts: the newest campaign of this config that finished
    by its own convergence rule (its last round's manifest says stop), its final global model.

    A campaign that failed or was abandoned (its last round has no manifest, or its manifest
    says go on) is a source only with ``warm_start_unfinished``: then its newest round that
    has a manifest. Returns the source's ``campaign``, ``round``, ``model``, ``manifest``,
    ``manifest_sha256`` and ``finished``, or None.
    """
    best: tuple[str, dict[str, Any]] | None = None
    for campaign_dir in _config_campaigns(config, exclude=exclude):
        rounds = round_dirs(campaign_dir)
        finished = False
        for position, (number, folder) in enumerate(reversed(rounds)):
            manifest = _read_manifest(folder / MANIFEST)
            if manifest is None:
                continue
            finished = position == 0 and bool((manifest.get("decision") or {}).get("stop"))
            break
        else:
            continue
        if not finished and not config.warm_start_unfinished:
            continue
        if not (folder / "global" / "config.json").is_file():
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
    config: FederationConfig, *, exclude: str, active: Callable[[list[str]], int]
) -> tuple[str, str] | None:
    """Another campaign of this config whose next round is queued or running: ``(campaign,
    run id)``, else None. ``active(run_ids)`` counts those runs that are queued or running.

    A campaign is in flight when its last round has no manifest yet (that round's run), or
    its last manifest says go on (the next round's run); a run that failed or never existed
    is not active, so a failed campaign never holds the next one back.
    """
    candidates: list[tuple[str, str]] = []
    for campaign_dir in _config_campaigns(config, exclude=exclude):
        rounds = round_dirs(campaign_dir)
        if not rounds:
            continue
        number, folder = rounds[-1]
        manifest = _read_manifest(folder / MANIFEST)
        if manifest is None:
            candidates.append((campaign_dir.name, run_id(campaign_dir.name, number)))
        elif not (manifest.get("decision") or {}).get("stop"):
            candidates.append((campaign_dir.name, str(manifest.get("next_run_id") or run_id(campaign_dir.name, number + 1))))
    if not candidates or not active([rid for _, rid in candidates]):
        return None
    return next(((name, rid) for name, rid in candidates if active([rid])), None)


def training_command(config: FederationConfig, facility_name: str, remote: RemoteLayout) -> str:
    """The shell command that trains at ``facility_name`` (absolute remote paths, quoted)."""
    facility = config.facility(facility_name)
    model = f"{facility.workdir}/{remote.global_dir}"
    out = f"{facility.workdir}/{remote.local_dir}"
    hyperparameters = config.training.hyperparameters
    adapter = None
    if config.training.peft is not None:  # the base model stays, the round's adapter trains
        model, adapter = f"{facility.workdir}/{remote_base(remote)}", model
        if config.aggregation.strategy == "lora-frozen-a":
            hyperparameters = {**hyperparameters, "lora_train_a": False}
    if config.training.command:
        return config.training.command.format(
            python=shlex.quote(facility.python),
            model=shlex.quote(model),
            data=shlex.quote(facility.data),
            out=shlex.quote(out),
        )
    from xffl_airflow.training_job import build_training_command

    return build_training_command(
        python=facility.python,
        launcher=facility.launcher,
        model_dir=model,
        data_path=facility.data,
        out_dir=out,
        hyperparameters=hyperparameters,
        nproc_per_node=facility.nproc_per_node,
        adapter_dir=adapter,
    )


def remote_base(remote: RemoteLayout) -> str:
    """Where a LoRA campaign keeps the base model at a facility, across its rounds."""
    return f"{remote.campaign}/base"


def initial_adapter_for(config: FederationConfig, layout: CampaignLayout) -> Path:
    """The campaign's first global adapter (A from the training seed, B zero), made once."""
    from xffl_tasks.adapter import LoraSettings, initial_adapter

    folder = layout.campaign_dir / "initial-adapter"
    if not (folder / "adapter_config.json").is_file():
        peft = config.training.peft
        settings = LoraSettings(r=peft.r, alpha=peft.alpha, dropout=peft.dropout, target_modules=tuple(peft.target_modules))
        initial_adapter(Path(config.base_model), folder, settings, seed=int(config.training.hyperparameters.get("seed", 0)))
    return folder


def batch_preamble(config: FederationConfig, facility_name: str) -> list[str]:
    return list(config.facility(facility_name).preamble)


def _round_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise RunConfError(f"params.round: must be a whole number from 0 to 1000000, got {str(value)[:40]!r}")
    return value


def prepare_round(
    *,
    config_path: str,
    dag_id: str,
    dag_facilities: list[str],
    run_conf: dict[str, Any],
    run_type: str,
    logical_date: Any = None,
    active_runs: Callable[[list[str]], int] | None = None,
) -> dict[str, Any] | None:
    """Validates the config, the run's parameters and the round, resolves the input model,
    plans every facility.

    Round 0 of a new campaign while another campaign of this config is in flight (its next
    round queued or running; ``active_runs`` counts such runs) returns None, saying why: the
    run is skipped (``prepare`` short-circuits), so two campaigns never interleave round by
    round. A scheduled run that finds the DAG busy this way is skipped, not postponed.

    ``config_path`` is the DAG's own (fixed when the DAG is built, never a run parameter);
    ``run_conf`` is every key the run was given: the campaign, the round and the knobs the
    config opens. Anything else is refused here, naming it, before any facility work.
    """
    base = load_config(config_path)
    refusals: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except RunConfError as error:  # every refusal of the run at once, each naming its field
            refusals.append(str(error))
            return None

    overrides = attempt(accept_run_conf, run_conf, base.knobs, base.knob_defaults()) or {}
    round_number = attempt(_round_number, run_conf.get("round", 0))
    campaign = run_conf.get("campaign") or None
    if campaign is not None:
        attempt(check_campaign, campaign, "params.campaign")
    if refusals:
        raise RunConfError("\n".join(refusals))
    config = load_config(config_path, overrides) if overrides else base
    if overrides:
        log.info("this run changes %s", ", ".join(f"{s}.{k}={v!r}" for s, d in overrides.items() for k, v in d.items()))
    names = [f.name for f in config.facilities]
    if names != dag_facilities:
        raise ConfigError(
            f"{config_path}: facilities {names} differ from the DAG's {dag_facilities}; "
            "a run can change settings, not the set of facilities (edit the config and let the DAG reload)"
        )
    check_connections(config)
    name = campaign_name(config, requested=campaign, run_type=run_type, logical_date=logical_date)
    layout = CampaignLayout(Path(config.storage), name)
    later = [n for n, _ in round_dirs(layout.campaign_dir)] if layout.campaign_dir.is_dir() else []
    if any(n > round_number for n in later):
        raise RoundError(
            f"campaign {name}: round {round_number} cannot run again, later rounds exist ({max(later)}); "
            "start a new campaign instead"
        )
    warm = None
    if round_number == 0 and active_runs is not None and not later:
        busy = campaign_in_flight(config, exclude=name, active=active_runs)
        if busy:
            log.warning(
                "skipping this run: campaign %s of this config is still running (its run %s is queued or "
                "running); campaign %s would interleave with it round by round. Trigger it again when %s ends.",
                busy[0], busy[1], name, busy[0],
            )  # fmt: skip
            return None
    peft = config.training.peft is not None
    if round_number == 0:
        input_model = Path(config.base_model)
        if peft:
            layout.campaign_dir.mkdir(parents=True, exist_ok=True)
            input_model = initial_adapter_for(config, layout)
        if config.warm_start:
            warm = warm_start_source(config, exclude=name)
            if warm:
                input_model = Path(warm["model"])
                log.info(
                    "warm start from campaign %s round %d (%s; manifest %s, sha256 %s)", warm["campaign"],
                    warm["round"], "finished" if warm["finished"] else "unfinished", warm["manifest"],
                    warm["manifest_sha256"],
                )  # fmt: skip
            else:
                log.info("warm start: no finished campaign of this config yet; starting from the base model")
    else:
        input_model = layout.global_model(round_number - 1)
        if not layout.manifest(round_number - 1).is_file():
            raise RoundError(f"campaign {name}: round {round_number - 1} has no manifest; it did not finish")
    marker = "adapter_config.json" if peft else "config.json"
    if not (input_model / marker).is_file():
        kind = "an adapter folder" if peft else "a model folder"
        raise RoundError(f"campaign {name} round {round_number}: input model {input_model} is not {kind}")
    layout.round_dir(round_number).mkdir(parents=True, exist_ok=True)
    pushed_model = model_view(input_model, layout.round_dir(round_number) / "input")
    remote = RemoteLayout(name, round_number)
    lora = None
    if peft:  # pushed once per facility, kept there across rounds (unchanged files: a hash)
        base_view = model_view(Path(config.base_model), layout.round_dir(round_number) / "base")
        lora = {"base_model": config.base_model, "pushed_base": str(base_view), "remote_base": remote_base(remote)}
    facilities = {}
    for facility in config.facilities:
        facilities[facility.name] = {
            "conn_id": facility.connection_id,
            "workdir": facility.workdir,
            "remote_round": remote.round_dir,
            "remote_global": remote.global_dir,
            "remote_local": remote.local_dir,
            "remote_jobs": f"{facility.workdir}/{remote.jobs_dir}",
            "command": training_command(config, facility.name, remote),
            "sbatch": {**facility.sbatch, "preamble": batch_preamble(config, facility.name)},
            "weight": facility.weight,
        }
    plan = {
        "dag_id": dag_id,
        "campaign": name,
        "round": round_number,
        "config_path": str(config_path),
        "overrides": overrides or {},
        "config_sha256": config_sha256(config),
        "storage": config.storage,
        "round_dir": str(layout.round_dir(round_number)),
        "input_model": str(input_model),
        "pushed_model": str(pushed_model),
        "warm_start_manifest": warm["manifest"] if warm else None,
        "warm_start": warm,
        "required_facilities": config.required_facilities,
        "peft": lora,
        "started_at": _now(),
        "facilities": facilities,
    }
    log.info(
        "campaign %s round %d: %d facilities (%s), quorum %d, input model %s",
        name, round_number, len(facilities), ", ".join(facilities), config.required_facilities, input_model,
    )  # fmt: skip
    return plan


# -- transfers ---------------------------------------------------------------------------


def _remote(plan: dict[str, Any], facility: str):
    from xffl_airflow.transfer import RemoteFacility

    entry = plan["facilities"][facility]
    return RemoteFacility(name=facility, conn_id=entry["conn_id"], workdir=entry["workdir"])


def push_global(plan: dict[str, Any], facility: str) -> dict[str, Any]:
    """Pushes the round's input model to the facility (unchanged files cost only a hash)."""
    from xffl_airflow.transfer import push

    base = None
    if plan.get("peft"):  # the base model first: sent in full once, then only hashed
        base = push(Path(plan["peft"]["pushed_base"]), _remote(plan, facility), plan["peft"]["remote_base"]).to_dict()
        log.info(
            "%s: base model %s in place (%d bytes sent, %d skipped)",
            facility, plan["peft"]["base_model"], base["bytes_sent"], base["bytes_skipped"],
        )  # fmt: skip
    report = push(Path(plan["pushed_model"]), _remote(plan, facility), plan["facilities"][facility]["remote_global"])
    result = report.to_dict()
    if base is not None:
        result["base"] = base
    log.info(
        "%s: pushed %s (%d bytes sent, %d skipped) in %.2f s",
        facility, plan["input_model"], result["bytes_sent"], result["bytes_skipped"], result["seconds"],
    )  # fmt: skip
    return result


def pull_local(plan: dict[str, Any], facility: str) -> dict[str, Any]:
    """Pulls the model trained at the facility into ``round-NNNN/clients/<facility>``."""
    from xffl_airflow.transfer import pull

    layout = CampaignLayout(Path(plan["storage"]), plan["campaign"])
    target = layout.client_dir(plan["round"], facility)
    target.parent.mkdir(parents=True, exist_ok=True)
    report = pull(_remote(plan, facility), plan["facilities"][facility]["remote_local"], target).to_dict()
    metrics_path = target / "metrics.json"
    if not metrics_path.is_file():
        raise RoundError(f"{facility}: the trained model has no metrics.json ({target})")
    # a facility's outputs are untrusted: bounded, schema-checked metrics and headers that
    # match the round's input model, or the facility is left out of the round (no retry)
    from airflow.sdk.exceptions import AirflowFailException

    from xffl_tasks.aggregate.errors import AggregationError
    from xffl_tasks.aggregate.metrics import read_metrics
    from xffl_tasks.aggregate.model_folder import check_same_tensors, open_model_folder

    try:
        metrics = read_metrics(target, facility)
        if plan.get("peft"):
            from xffl_tasks.aggregate.lora import check_client_adapter

            check_client_adapter(Path(plan["input_model"]), target, label=f"client {facility!r}")
        else:
            previous = open_model_folder(Path(plan["input_model"]), label="the round's input model")
            check_same_tensors(previous, open_model_folder(target, label=f"client {facility!r}"))
    except AggregationError as error:
        aside = target.with_name(f"{target.name}.rejected")
        if aside.exists():
            shutil.rmtree(aside)
        target.rename(aside)  # kept for inspection, never read by the round
        raise AirflowFailException(f"outputs refused: {error} (set aside in {aside})") from None
    log.info(
        "%s: pulled %s in %.2f s; val loss %s -> %s on %s samples",
        facility, target, report["seconds"], metrics.get("val_loss_before"), metrics.get("val_loss_after"),
        metrics.get("num_samples"),
    )  # fmt: skip
    return {"transfer": report, "metrics": metrics, "path": str(target)}


def record_failure(plan: dict[str, Any] | None, facility: str, task_id: str, try_number: int, error: Any) -> None:
    """Keeps why a facility missed the round, for the aggregation task and the manifest."""
    if not plan:
        return
    path = CampaignLayout(Path(plan["storage"]), plan["campaign"]).failure_record(plan["round"], facility)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path, {"facility": facility, "task_id": task_id, "try_number": try_number, "error": str(error)[-4000:], "at": _now()}
    )


# -- aggregation -------------------------------------------------------------------------


def _missing_reason(plan: dict[str, Any], facility: str) -> str:
    path = CampaignLayout(Path(plan["storage"]), plan["campaign"]).failure_record(plan["round"], facility)
    if path.is_file():
        record = json.loads(path.read_text())
        if str(record["error"]).startswith("outputs refused: "):  # pull_local's refusal
            return f"rejected: {record['error']}"
        return f"{record['task_id']} failed after {record['try_number']} attempt(s): {record['error']}"
    return "its tasks did not finish"


def pulled_hashes(pulled: dict[str, dict[str, Any] | None], participants: list[str]) -> dict[str, dict[str, Any]]:
    """The sha256 the pulls verified, with each file's size and mtime then, by local path: the
    aggregation takes them instead of reading the files again (a file changed since is hashed)."""
    given: dict[str, dict[str, Any]] = {}
    for name in participants:
        transfer = pulled[name]["transfer"]
        for relative, digest in transfer["files"].items():
            stat = transfer.get("file_stats", {}).get(relative)
            if stat:
                given[str(Path(pulled[name]["path"]) / relative)] = {"sha256": digest, **stat}
    return given


def aggregate_round(plan: dict[str, Any] | None, pulled: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Aggregates the facilities that delivered a model, if they are enough for the quorum."""
    if not plan:
        raise RoundError("the round was not prepared (the prepare task failed); see its log")
    participants = [name for name, result in pulled.items() if result]
    missing = {name: _missing_reason(plan, name) for name, result in pulled.items() if not result}
    for name, reason in missing.items():
        log.warning("%s missed round %d: %s", name, plan["round"], reason)
    if len(participants) < plan["required_facilities"]:
        raise RoundError(
            f"campaign {plan['campaign']} round {plan['round']}: {len(participants)} of {len(pulled)} facilities "
            f"delivered a model, quorum is {plan['required_facilities']}; missing: "
            + "; ".join(f"{k}: {v}" for k, v in missing.items())
        )
    from xffl_tasks.aggregate import aggregate

    config = load_config(plan["config_path"], plan["overrides"] or None)
    layout = CampaignLayout(Path(plan["storage"]), plan["campaign"])
    out = layout.global_model(plan["round"])
    if out.exists():  # a retry after an earlier attempt got this far: redo it from the inputs
        aside = out.with_name(f"global.stale-{int(time.time())}")
        out.rename(aside)
        shutil.rmtree(aside)
    # an attempt killed while aggregating (SIGKILL, the node lost) could not remove its staging
    # folder (xffl_tasks.aggregate.staging: ".global.partial-*"); one attempt runs at a time
    _remove_leftovers([*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob("global.stale-*")])
    weights = None
    if any(plan["facilities"][n]["weight"] is not None for n in participants):
        weights = [float(plan["facilities"][n]["weight"] or 0) for n in participants]
    from xffl_tasks.aggregate.errors import AggregationError

    started = time.monotonic()
    try:
        report = aggregate(
            Path(plan["input_model"]),
            [Path(pulled[n]["path"]) for n in participants],
            out,
            strategy=config.aggregation.strategy,
            weights=weights,
            names=participants,
            options=config.aggregation.options or None,
            min_clients=plan["required_facilities"],
            max_weight_share=config.aggregation.max_weight_share,
            input_hashes=pulled_hashes(pulled, participants),
        )
    except AggregationError as error:  # bad input does not pass on a retry
        raise RoundError(
            f"campaign {plan['campaign']} round {plan['round']}: the aggregation refused its input "
            f"(quorum {plan['required_facilities']}): {error}"
        ) from error
    rejected = {name: f"rejected by the aggregation: {reason}" for name, reason in report.get("rejected", {}).items()}
    for name, reason in rejected.items():
        log.warning("%s is left out of round %d: %s", name, plan["round"], reason)
    missing.update(rejected)
    rejected.update({name: reason for name, reason in missing.items() if reason.startswith("rejected")})
    participants = [name for name in participants if name not in rejected]
    log.info(
        "aggregated %d facilities with %s in %.2f s; global update norm %s",
        len(participants), config.aggregation.strategy, time.monotonic() - started, report.get("global_update_norm"),
    )  # fmt: skip
    return {"participants": participants, "missing": missing, "rejected": rejected, "report": report, "path": str(out)}


# -- finalize ----------------------------------------------------------------------------


def _history(layout: CampaignLayout, before_round: int) -> list[RoundOutcome]:
    outcomes = []
    for number, folder in round_dirs(layout.campaign_dir):
        if number >= before_round or not (folder / MANIFEST).is_file():
            continue
        manifest = json.loads((folder / MANIFEST).read_text())
        outcomes.append(
            RoundOutcome(number, manifest.get("weighted_val_loss"), (manifest.get("aggregation") or {}).get("global_update_norm"))
        )
    return outcomes


def _killed_writes(folder: Path, names: list[str]) -> list[Path]:
    """The temporary files that atomic writes of ``names`` in ``folder`` leave when their writer
    is killed before the rename (``tempfile.mkstemp(prefix="." + name + ".")``)."""
    return [stale for name in names for stale in Path(folder).glob(f".{name}.*")]


def _remove_leftovers(paths: list[Path]) -> None:
    """Removes what an earlier attempt, killed mid-write, left behind (files or folders); one
    attempt of a round's task runs at a time, so none of them is being written."""
    for stale in paths:
        log.warning("removing %s, left by an earlier attempt that was killed", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def finalize_round(
    plan: dict[str, Any],
    *,
    pushed: dict[str, dict[str, Any] | None],
    trained: dict[str, dict[str, Any] | None],
    pulled: dict[str, dict[str, Any] | None],
    aggregated: dict[str, Any],
    run_id_value: str,
    run_url: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Decides on convergence, writes the round's manifest and the campaign report.

    Returns the decision, the next round's run id, conf and note (``run_url(run_id)`` links
    runs in the log and the note), and ``global_model``: the extra of the asset event of the
    campaign's global model (``xffl_airflow.federation.assets``).
    """
    config = load_config(plan["config_path"], plan["overrides"] or None)
    layout = CampaignLayout(Path(plan["storage"]), plan["campaign"])
    round_number = plan["round"]
    report = aggregated["report"]
    weights = {c["name"]: c.get("normalized_weight", c.get("weight", 0.0)) for c in report.get("clients", [])}
    facilities: dict[str, Any] = {}
    for name in plan["facilities"]:
        metrics = (pulled.get(name) or {}).get("metrics")
        status = "ok" if name in aggregated["participants"] else "missing"
        if name in aggregated.get("rejected", {}):
            status = "rejected"
        facilities[name] = {
            "status": status,
            "reason": aggregated["missing"].get(name),
            "conn_id": plan["facilities"][name]["conn_id"],
            "weight": weights.get(name),
            "job": trained.get(name),
            "push": _transfer_summary(pushed.get(name)),
            "push_base": _transfer_summary((pushed.get(name) or {}).get("base")),
            "pull": _transfer_summary((pulled.get(name) or {}).get("transfer")),
            "metrics": metrics,
        }
    def _loss(facility: dict[str, Any], key: str) -> float | None:  # validated metrics, still checked
        value = (facility["metrics"] or {}).get(key) if isinstance(facility["metrics"], dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    counted = [n for n, f in facilities.items() if f["status"] == "ok" and f["metrics"]]
    losses_before = {n: _loss(facilities[n], "val_loss_before") for n in counted}
    losses_after = {n: _loss(facilities[n], "val_loss_after") for n in counted}
    loss = weighted_loss(losses_before, weights)
    loss_after = weighted_loss(losses_after, weights)
    history = _history(layout, round_number) + [RoundOutcome(round_number, loss, report.get("global_update_norm"))]
    decision = decide(
        history,
        max_rounds=config.convergence.max_rounds,
        min_improvement=config.convergence.min_improvement,
        patience=config.convergence.patience,
        min_update_norm=config.convergence.min_update_norm,
    )
    round_dir = layout.round_dir(round_number)
    outputs = {f"global/{k}": v for k, v in hash_tree(layout.global_model(round_number)).items()}
    inputs = {
        "model": plan["input_model"],
        "model_files": next((p["files"] for p in pushed.values() if p and "files" in p), None),
        "clients": {n: p and (p.get("transfer") or {}).get("files") for n, p in pulled.items()},
    }
    if plan.get("peft"):  # the frozen base model's files, beside the adapter's (model_files)
        inputs["base_model"] = plan["peft"]["base_model"]
        inputs["base_model_files"] = next((p["base"]["files"] for p in pushed.values() if p and p.get("base")), None)
    previous = layout.manifest(round_number - 1) if round_number > 0 else plan.get("warm_start_manifest")
    next_run = run_id(plan["campaign"], round_number + 1)
    manifest = {
        "campaign": plan["campaign"],
        "round": round_number,
        "dag_id": plan["dag_id"],
        "run_id": run_id_value,
        "config_path": plan["config_path"],
        "config_sha256": plan["config_sha256"],
        "overrides": plan["overrides"],
        "started_at": plan["started_at"],
        "finished_at": _now(),
        "facilities": facilities,
        "participants": aggregated["participants"],
        "missing": aggregated["missing"],
        "rejected": aggregated.get("rejected", {}),
        "weights": weights,
        "inputs": inputs,
        "aggregation": {
            k: report.get(k)
            for k in ("strategy", "seconds", "global_update_norm", "bytes_read", "bytes_written")
        },
        "outputs": outputs,
        "weighted_val_loss": loss,
        "weighted_val_loss_after": loss_after,
        "decision": decision.to_dict(),
        "next_run_id": None if decision.stop else next_run,
    }
    if round_number == 0 and plan.get("warm_start"):
        manifest["warm_start"] = plan["warm_start"]  # the source campaign, round, manifest and its sha256
    # a finalize killed inside an atomic write leaves its temporary file ("." + name + random)
    _remove_leftovers(
        _killed_writes(round_dir, ["manifest.json"])
        + _killed_writes(layout.campaign_dir, ["report.png", "report.txt"])
    )
    path = write_manifest(round_dir, manifest, previous)
    log.info("round %d of %s: %s; manifest %s", round_number, plan["campaign"], decision.reason, path)
    this_run = run_url(run_id_value) if run_url else None
    next_url = run_url(next_run) if run_url else None
    if not decision.stop:
        log.info("next round: run %s%s", next_run, f" at {next_url}" if next_url else "")
    from xffl_airflow.federation.report import write_report

    # the table every round; the plot (matplotlib: about a second) when the campaign ends
    table, txt, png = write_report(layout.campaign_dir, draw=decision.stop)
    log.info("campaign %s so far:\n%s\nreport: %s%s", plan["campaign"], table, txt, f" and {png}" if png else "")
    return {
        "stop": decision.stop,
        "reason": decision.reason,
        "manifest": str(path),
        "weighted_val_loss": loss,
        "next_run_id": next_run,
        "next_note": round_note(plan["campaign"], round_number + 1, config.convergence.max_rounds,
                                previous_run=run_id_value, previous_url=this_run, loss=loss),  # fmt: skip
        "global_model": {
            "campaign": plan["campaign"],
            "round": round_number,
            "run_id": run_id_value,
            "path": str(layout.global_model(round_number)),
            "manifest": str(path),
            "sha256": outputs,
            "weighted_val_loss": loss,
            "weighted_val_loss_after": loss_after,
            "decision": decision.to_dict(),
        },
        "next_conf": {
            "campaign": plan["campaign"],
            "round": round_number + 1,
            # the knobs this run changed, as run parameters: the next round runs with the same
            **{name: value for section in plan["overrides"].values() for name, value in section.items()},
        },
    }


def round_note(campaign: str, round_number: int, max_rounds: int, *, previous_run: str | None = None,
               previous_url: str | None = None, loss: float | None = None) -> str:
    """The run note (Markdown, shown in the UI's run list and header): campaign and round, and
    the run it continues."""
    text = f"Campaign **{campaign}**, round {round_number} (at most {max_rounds})"
    if previous_run:
        link = f"[{previous_run}]({previous_url})" if previous_url else f"`{previous_run}`"
        text += f"; continues {link}"
        if loss is not None:
            text += f" (weighted validation loss {loss:.4f})"
    return text


def _transfer_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    keys = ("seconds", "bytes_total", "bytes_sent", "bytes_skipped", "files_skipped", "mbps", "retries")
    summary = {k: report.get(k) for k in keys}
    if isinstance(report.get("files"), dict):  # which files this transfer covered (sent or skipped)
        summary["files"] = sorted(report["files"])
    return summary
