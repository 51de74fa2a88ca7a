"""A round's differential privacy, on the Airflow side (docs/privacy.md).

- ``prepare``: what each facility's data has spent (the previous round's manifest, or at round 0
  the warm-start source's: the same data) decides who may train; a facility whose next run
  would exceed its ``epsilon_budget`` is not trained this round ("privacy budget spent"), and a
  round that would leave fewer than the quorum is refused before any facility work.
- the pull: a facility's metrics.json must report the DP-SGD run the plan asked for (mode,
  noise or target, clipping norm, delta, accountant); a facility that trained without DP, or
  with other parameters, is set aside like any other bad output.
- ``finalize``: the ledger (``xffl_tasks.privacy.ledger``): each facility's runs so far, composed
  by the accountant, recorded in the manifest; when fewer than the quorum could train another
  round within their budgets, the campaign stops ("privacy budget spent").
"""

from __future__ import annotations

import math
from typing import Any

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_tasks.manifest import read_manifest

SPENT = "privacy budget spent"


def previous_ledger(layout: CampaignLayout, round_number: int, warm: dict[str, Any] | None) -> dict[str, Any]:
    """Each facility's ledger entry so far: the previous round's manifest's, or the warm-start
    source's at round 0 (the campaigns of a warm-start lineage train on the same data)."""
    if round_number > 0:
        manifest = read_manifest(layout.manifest(round_number - 1))
    else:
        manifest = read_manifest(warm["manifest"]) if warm else None
    record = (manifest or {}).get("privacy")
    facilities = record.get("facilities") if isinstance(record, dict) else None
    return dict(facilities) if isinstance(facilities, dict) else {}


def exclusions(config: Any, ledger: dict[str, Any]) -> dict[str, str]:
    """The facilities whose next run would exceed their budget, and why."""
    excluded = {}
    for facility in config.facilities:
        budget, entry = config.epsilon_budget(facility.name), ledger.get(facility.name) or {}
        following = entry.get("next_round_epsilon")
        if budget is not None and isinstance(following, (int, float)) and following > budget:
            excluded[facility.name] = (f"{SPENT}: another run would reach epsilon {following:.4g}, its budget is "
                                       f"{budget:g} (spent {entry.get('epsilon', 0):.4g})")  # fmt: skip
    trainable = len(config.facilities) - len(excluded)
    if excluded and trainable < config.required_facilities:
        raise RoundError(
            f"{SPENT}: {trainable} of {len(config.facilities)} facilities could train within their budgets, the "
            f"quorum is {config.required_facilities} (" + "; ".join(f"{k}: {v}" for k, v in sorted(excluded.items()))
            + "); nothing was pushed"
        )
    return excluded


def check_reported(plan: Any, facility: str, metrics: dict[str, Any]) -> None:
    """Refuses (``AggregationError``, naming the facility and field) metrics that do not report
    the DP-SGD run the plan asked for."""
    from xffl_tasks.aggregate.errors import AggregationError
    from xffl_tasks.privacy.accountant import PrivacyError, params_from_metrics

    wanted = plan.privacy
    reported = metrics.get("privacy")
    label = f"client {facility!r}: metrics.json"
    if not isinstance(reported, dict) or reported.get("mode") != wanted.mode:
        raise AggregationError(f"{label} reports no DP-SGD run (privacy.mode {str((reported or {}).get('mode'))[:20]!r}); "
                               "the plan asks for dp-sgd")  # fmt: skip
    try:
        params_from_metrics(reported)
    except PrivacyError as error:
        raise AggregationError(f"{label} {error}") from None
    expected = {"max_grad_norm": wanted.max_grad_norm, "accountant": wanted.accountant,
                "noise_multiplier": wanted.noise_multiplier, "target_epsilon": wanted.target_epsilon,
                "delta": wanted.delta}  # fmt: skip
    for field, value in expected.items():
        if value is None:
            continue
        got = reported.get(field)
        same = got == value if isinstance(value, str) else isinstance(got, (int, float)) and math.isclose(got, value, rel_tol=1e-12)
        if not same:
            raise AggregationError(f"{label} privacy.{field} is {got!r}, the plan's is {value!r}: trained with other "
                                   "DP parameters than the plan's")  # fmt: skip
    leaked = [name for name in metrics if name.startswith("train_loss")]
    if wanted.withhold_validation:
        leaked += [name for name in metrics if name.startswith("val_loss")]
    if leaked:  # a DP run never reports these: a facility that does ran something else
        raise AggregationError(f"{label} reports {', '.join(sorted(leaked))}, which a DP-SGD run withholds "
                               "(losses on the private data are outside the guarantee)")  # fmt: skip


def round_ledger(sealed: Any, previous: dict[str, Any], delivered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``privacy`` record: each facility's ledger after this round (a facility
    whose model came back, even one the aggregation then left out, spent this round's run)."""
    from xffl_tasks.privacy.accountant import params_from_metrics
    from xffl_tasks.privacy.ledger import facility_entry

    plan = sealed.plan
    facilities = {}
    for entry in plan.facilities:
        before = previous.get(entry.name) or {}
        history = list(before.get("history") or [])
        deltas = [before["delta"]] if isinstance(before.get("delta"), (int, float)) else []
        metrics = (delivered.get(entry.name) or {}).get("metrics") or {}
        trained = isinstance(metrics.get("privacy"), dict)
        if trained:
            run, delta = params_from_metrics(metrics["privacy"])
            history.append({"campaign": plan.campaign, "round": plan.round, "sample_rate": run.sample_rate,
                            "noise_multiplier": run.noise_multiplier, "steps": run.steps})  # fmt: skip
            deltas.append(delta)
        if not history:
            continue
        facilities[entry.name] = facility_entry(history, delta=min(deltas), accountant=plan.privacy.accountant,
                                                budget=entry.epsilon_budget, trained=trained)  # fmt: skip
    return {"accountant": plan.privacy.accountant, "facilities": facilities}


def budget_stop(ledger: dict[str, Any], plan: Any) -> str | None:
    """Why the campaign stops for privacy (None: it need not): fewer than the quorum of
    facilities could train another round within their budgets."""
    spent = {name: e for name, e in ledger["facilities"].items() if not e.get("budget_left", True)}
    if len(plan.facilities) - len(spent) >= plan.quorum:
        return None
    return f"{SPENT}: " + "; ".join(
        f"{name} would reach epsilon {e['next_round_epsilon']:.4g} (budget {e['budget']:g})" for name, e in sorted(spent.items())
    )  # fmt: skip
