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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xffl_airflow.federation.config import ConfigError, FederationConfig, config_sha256, load_config
from xffl_airflow.federation.connections import check_connections
from xffl_airflow.federation.convergence import RoundOutcome, decide, weighted_loss
from xffl_airflow.federation.knobs import RunConfError, accept_run_conf, check_campaign
from xffl_airflow.federation.layout import CampaignLayout, RemoteLayout, run_id
from xffl_tasks.manifest import MANIFEST, hash_tree, round_dirs, write_json_atomic, write_manifest

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


def latest_final_model(config: FederationConfig, *, exclude: str) -> tuple[Path, Path] | None:
    """The final global model and manifest of the newest finished campaign of this config."""
    storage = Path(config.storage)
    best: tuple[str, Path, Path] | None = None
    if not storage.is_dir():
        return None
    for campaign_dir in storage.iterdir():
        if campaign_dir.name == exclude or not (
            campaign_dir.name == config.campaign or campaign_dir.name.startswith(config.campaign + "-")
        ):
            continue
        rounds = round_dirs(campaign_dir)
        if not rounds:
            continue
        manifest_path = rounds[-1][1] / MANIFEST
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        if not (manifest.get("decision") or {}).get("stop"):
            continue
        finished = manifest.get("finished_at") or ""
        if best is None or finished > best[0]:
            best = (finished, rounds[-1][1] / "global", manifest_path)
    return (best[1], best[2]) if best else None


def training_command(config: FederationConfig, facility_name: str, remote: RemoteLayout) -> str:
    """The shell command that trains at ``facility_name`` (absolute remote paths, quoted)."""
    facility = config.facility(facility_name)
    model = f"{facility.workdir}/{remote.global_dir}"
    out = f"{facility.workdir}/{remote.local_dir}"
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
        hyperparameters=config.training.hyperparameters,
        nproc_per_node=facility.nproc_per_node,
    )


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
) -> dict[str, Any]:
    """Validates the config, the run's parameters and the round, resolves the input model,
    plans every facility.

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
    warm_manifest = None
    if round_number == 0:
        input_model = Path(config.base_model)
        if config.warm_start:
            found = latest_final_model(config, exclude=name)
            if found:
                input_model, warm_manifest = found
                log.info("warm start from %s (manifest %s)", input_model, warm_manifest)
    else:
        input_model = layout.global_model(round_number - 1)
        if not layout.manifest(round_number - 1).is_file():
            raise RoundError(f"campaign {name}: round {round_number - 1} has no manifest; it did not finish")
    if not (input_model / "config.json").is_file():
        raise RoundError(f"campaign {name} round {round_number}: input model {input_model} is not a model folder")
    layout.round_dir(round_number).mkdir(parents=True, exist_ok=True)
    pushed_model = model_view(input_model, layout.round_dir(round_number) / "input")
    remote = RemoteLayout(name, round_number)
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
        "warm_start_manifest": str(warm_manifest) if warm_manifest else None,
        "required_facilities": config.required_facilities,
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

    report = push(Path(plan["pushed_model"]), _remote(plan, facility), plan["facilities"][facility]["remote_global"])
    result = report.to_dict()
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


def finalize_round(
    plan: dict[str, Any],
    *,
    pushed: dict[str, dict[str, Any] | None],
    trained: dict[str, dict[str, Any] | None],
    pulled: dict[str, dict[str, Any] | None],
    aggregated: dict[str, Any],
    run_id_value: str,
) -> dict[str, Any]:
    """Decides on convergence, writes the round's manifest and the campaign report."""
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
    path = write_manifest(round_dir, manifest, previous)
    log.info("round %d of %s: %s; manifest %s", round_number, plan["campaign"], decision.reason, path)
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
        "next_conf": {
            "campaign": plan["campaign"],
            "round": round_number + 1,
            # the knobs this run changed, as run parameters: the next round runs with the same
            **{name: value for section in plan["overrides"].values() for name, value in section.items()},
        },
    }


def _transfer_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    keys = ("seconds", "bytes_total", "bytes_sent", "bytes_skipped", "files_skipped", "mbps", "retries")
    return {k: report.get(k) for k in keys}
