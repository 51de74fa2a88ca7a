"""The round's last step: decide on convergence, write the round's manifest and the report.

Everything the manifest records is read from the round's storage: the sealed plan (its sha256
is recorded), each facility's push, training and pull records made under that plan, and the
aggregation's record. XCom is not read. The next round's run id, conf and note are derived from
the manifest and the plan (``next_round``), so the task that triggers it obeys storage too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from xffl_airflow.federation.convergence import Decision, RoundOutcome, decide, weighted_loss
from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.names import run_id
from xffl_airflow.federation.rounds.campaigns import history
from xffl_airflow.federation.rounds.cleanup import killed_writes, remove_leftovers
from xffl_airflow.federation.rounds.store import SealedPlan, aggregate_result, now, step_result
from xffl_tasks.manifest import MANIFEST, hash_tree, read_manifest, write_manifest

log = logging.getLogger(__name__)

TRANSFER_KEYS = ("seconds", "bytes_total", "bytes_sent", "bytes_skipped", "files_skipped", "mbps", "retries")


def _transfer_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    summary = {k: report.get(k) for k in TRANSFER_KEYS}
    if isinstance(report.get("files"), dict):  # which files this transfer covered (sent or skipped)
        summary["files"] = sorted(report["files"])
    return summary


def _loss(metrics: Any, key: str) -> float | None:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def facility_records(sealed: SealedPlan, aggregated: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    """Per facility: status and reason, weight, job, transfers and metrics, from storage."""
    facilities: dict[str, Any] = {}
    for entry in sealed.plan.facilities:
        name = entry.name
        pushed = step_result(sealed, name, "push")
        pulled = step_result(sealed, name, "pull") or {}
        status = "ok" if name in aggregated["participants"] else "missing"
        if name in aggregated.get("rejected", {}):
            status = "rejected"
        facilities[name] = {
            "status": status,
            "reason": aggregated["missing"].get(name),
            "conn_id": entry.conn_id,
            "weight": weights.get(name),
            "job": step_result(sealed, name, "train"),
            "push": _transfer_summary(pushed),
            "push_base": _transfer_summary((pushed or {}).get("base")),
            "pull": _transfer_summary(pulled.get("transfer")),
            "metrics": pulled.get("metrics"),
        }
    return facilities


def finalize_step(sealed: SealedPlan, *, run: str, run_url: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Decides on convergence, writes the round's manifest and the campaign report.

    Returns what is shown (XCom): the decision, the manifest's path, and ``global_model``: the
    extra of the asset event of the campaign's global model (``xffl_airflow.federation.assets``).
    """
    plan, layout = sealed.plan, sealed.layout
    aggregated = aggregate_result(sealed)
    report = aggregated["report"]
    weights = {c["name"]: c.get("normalized_weight", c.get("weight", 0.0)) for c in report.get("clients", [])}
    facilities = facility_records(sealed, aggregated, weights)
    counted = [n for n, f in facilities.items() if f["status"] == "ok" and f["metrics"]]
    loss = weighted_loss({n: _loss(facilities[n]["metrics"], "val_loss_before") for n in counted}, weights)
    loss_after = weighted_loss({n: _loss(facilities[n]["metrics"], "val_loss_after") for n in counted}, weights)
    outcomes = history(layout, plan.round) + [RoundOutcome(plan.round, loss, report.get("global_update_norm"))]
    rules = plan.convergence
    decision = decide(outcomes, max_rounds=rules.max_rounds, min_improvement=rules.min_improvement,
                      patience=rules.patience, min_update_norm=rules.min_update_norm)  # fmt: skip
    ledger = None
    if plan.privacy is not None:  # what each facility's data has spent, and whether it may go on
        from xffl_airflow.federation.rounds.privacy import (
            budget_stop,
            previous_ledger,
            round_ledger,
        )

        warm = plan.warm_start.model_dump() if plan.warm_start else None
        delivered = {n: step_result(sealed, n, "pull") or {} for n in plan.facility_names}
        ledger = round_ledger(sealed, previous_ledger(layout, plan.round, warm), delivered)
        spent = budget_stop(ledger, plan)
        if spent and not decision.stop:
            decision = Decision(True, spent, decision.improvement)
    round_dir = layout.round_dir(plan.round)
    outputs = {f"global/{k}": v for k, v in hash_tree(layout.global_model(plan.round)).items()}
    inputs: dict[str, Any] = {
        "model": plan.input_model,
        "model_files": dict(plan.input_model_sha256),
        "clients": {name: ((step_result(sealed, name, "pull") or {}).get("transfer") or {}).get("files")
                    for name in plan.facility_names},
    }  # fmt: skip
    if plan.peft is not None:  # the frozen base model's files, beside the adapter's (model_files)
        inputs["base_model"] = plan.peft.base_model
        inputs["base_model_files"] = dict(plan.peft.base_model_sha256)
    previous = layout.manifest(plan.round - 1) if plan.round > 0 else (plan.warm_start.manifest if plan.warm_start else None)
    following = run_id(plan.campaign, plan.round + 1)
    manifest = {
        "campaign": plan.campaign,
        "round": plan.round,
        "dag_id": plan.dag_id,
        "federation": dict(plan.federation),
        "run_id": run,
        "plan": {"file": f"{round_dir.name}/plan.json", "sha256": sealed.sha256, "sealed_at": plan.sealed_at},
        "config_path": plan.config_path,
        "config_sha256": plan.config_sha256,
        "overrides": plan.overrides,
        "started_at": plan.sealed_at,
        "finished_at": now(),
        "facilities": facilities,
        "participants": aggregated["participants"],
        "missing": aggregated["missing"],
        "rejected": aggregated.get("rejected", {}),
        "weights": weights,
        "inputs": inputs,
        "aggregation": {k: report.get(k) for k in ("strategy", "seconds", "global_update_norm", "bytes_read", "bytes_written")},
        "outputs": outputs,
        "weighted_val_loss": loss,
        "weighted_val_loss_after": loss_after,
        "decision": decision.to_dict(),
        "next_run_id": None if decision.stop else following,
        "warnings": list(plan.warnings),
    }
    if ledger is not None:
        manifest["privacy"] = ledger
    if plan.round == 0 and plan.warm_start is not None:  # the source campaign, round, manifest and its sha256
        manifest["warm_start"] = plan.warm_start.model_dump(mode="json")
    # a finalize killed inside an atomic write leaves its temporary file ("." + name + random)
    remove_leftovers(killed_writes(round_dir, [MANIFEST]) + killed_writes(layout.campaign_dir, ["report.png", "report.txt"]))
    path = write_manifest(round_dir, manifest, previous)
    log.info("round %d of %s: %s; manifest %s (plan sha256 %s)", plan.round, plan.campaign, decision.reason, path,
             sealed.sha256)  # fmt: skip
    if not decision.stop:
        log.info("next round: run %s%s", following, f" at {run_url(following)}" if run_url else "")
    from xffl_airflow.federation.report import write_report

    # the table every round; the plot (matplotlib: about a second) when the campaign ends
    table, txt, png = write_report(layout.campaign_dir, draw=decision.stop)
    log.info("campaign %s so far:\n%s\nreport: %s%s", plan.campaign, table, txt, f" and {png}" if png else "")
    return {
        "stop": decision.stop,
        "reason": decision.reason,
        "manifest": str(path),
        "plan_sha256": sealed.sha256,
        "weighted_val_loss": loss,
        "next_run_id": None if decision.stop else following,
        "global_model": {
            "campaign": plan.campaign,
            "round": plan.round,
            "run_id": run,
            "path": str(layout.global_model(plan.round)),
            "manifest": str(path),
            "sha256": outputs,
            "weighted_val_loss": loss,
            "weighted_val_loss_after": loss_after,
            "decision": decision.to_dict(),
        },
    }


def round_manifest(sealed: SealedPlan) -> dict[str, Any]:
    """The round's manifest, written under this plan; a ``RoundError`` when there is none."""
    manifest = read_manifest(sealed.layout.manifest(sealed.round))
    if manifest is None or (manifest.get("plan") or {}).get("sha256") != sealed.sha256:
        raise RoundError(f"{sealed.where()}: no manifest written under this round's plan; finalize has not succeeded")
    return manifest


def next_round(sealed: SealedPlan, *, run_url: Callable[[str], str] | None = None) -> dict[str, Any] | None:
    """The next round's run id, conf and note from the round's manifest; None when it stops."""
    plan = sealed.plan
    manifest = round_manifest(sealed)
    if (manifest.get("decision") or {}).get("stop"):
        return None
    following = run_id(plan.campaign, plan.round + 1)
    this_run = str(manifest.get("run_id") or "")
    return {
        "run_id": following,
        "conf": {
            "campaign": plan.campaign,
            "round": plan.round + 1,
            # the knobs this run changed, as run parameters: the next round runs with the same
            **{name: value for section in plan.overrides.values() for name, value in section.items()},
        },
        "note": round_note(plan.campaign, plan.round + 1, plan.convergence.max_rounds, previous_run=this_run,
                           previous_url=run_url(this_run) if run_url and this_run else None,
                           loss=manifest.get("weighted_val_loss")),  # fmt: skip
    }


def round_note(campaign: str, round_number: int, max_rounds: int, *, previous_run: str | None = None,
               previous_url: str | None = None, loss: float | None = None) -> str:  # fmt: skip
    """The run note (Markdown, shown in the UI's run list and header): campaign and round, and
    the run it continues."""
    text = f"Campaign **{campaign}**, round {round_number} (at most {max_rounds})"
    if previous_run:
        link = f"[{previous_run}]({previous_url})" if previous_url else f"`{previous_run}`"
        text += f"; continues {link}"
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            text += f" (weighted validation loss {loss:.4f})"
    return text
