"""The privacy ledger: what each facility's data has spent, round after round, in the manifests.

Each round's manifest may hold a ``privacy`` record (docs/privacy.md)::

    {"accountant": "rdp",
     "facilities": {"site1": {"delta": 1e-05, "budget": 8.0,
                              "history": [{"campaign": "c", "round": 0, "sample_rate": 0.01,
                                           "noise_multiplier": 1.1, "steps": 30}, ...],
                              "round_epsilon": 0.41, "epsilon": 0.58, "next_round_epsilon": 0.71,
                              "budget_left": true}}}

``history`` is every DP-SGD run of the facility on its data so far, this campaign's and those of
the campaigns it was warm-started from (the same data); ``epsilon`` composes all of it with the
accountant at ``delta`` (the smallest delta any run reported); ``round_epsilon`` is this round's
run alone (None when the facility did not train this round); ``next_round_epsilon`` is what one
more run with this round's (or its latest) parameters would reach. ``check_ledger`` recomputes
every figure from the recorded parameters (``python -m xffl_tasks.verify`` runs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from xffl_tasks.privacy.accountant import DpRound, PrivacyError, epsilon, next_round_epsilon

#: How close a recorded epsilon and a recomputed one must be.
REL_TOL = 1e-9


def _rounds(history: Sequence[Mapping[str, Any]]) -> list[DpRound]:
    return [DpRound(float(h["sample_rate"]), float(h["noise_multiplier"]), int(h["steps"])) for h in history]


def facility_entry(history: Sequence[Mapping[str, Any]], *, delta: float, accountant: str, budget: float | None,
                   trained: bool) -> dict[str, Any]:  # fmt: skip
    """A facility's ledger entry from its history (this round's run last when ``trained``)."""
    rounds = _rounds(history)
    spent = epsilon(rounds, delta=delta, accountant=accountant)
    this = epsilon(rounds[-1:], delta=delta, accountant=accountant) if trained and rounds else None
    following = next_round_epsilon(rounds, rounds[-1], delta=delta, accountant=accountant) if rounds else None
    left = budget is None or following is None or following <= budget
    return {"delta": delta, "budget": budget, "history": [dict(h) for h in history], "round_epsilon": this,
            "epsilon": spent, "next_round_epsilon": following, "budget_left": left}  # fmt: skip


def _close(a: Any, b: float | None) -> bool:
    if b is None or a is None:
        return a is None and b is None
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return False
    if math.isinf(b) or math.isinf(float(a)):
        return float(a) == b
    return math.isclose(float(a), b, rel_tol=REL_TOL, abs_tol=1e-12)


def check_ledger(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every recorded epsilon recomputed from its recorded parameters; the problems found."""
    problems = []
    for manifest in manifests:
        record = manifest.get("privacy")
        if record is None:
            continue
        where = f"round {manifest.get('round')!r}'s manifest privacy"
        facilities = record.get("facilities") if isinstance(record, Mapping) else None
        if not isinstance(facilities, Mapping):
            problems.append(f"{where}: no facilities")
            continue
        accountant = record.get("accountant")
        for name, entry in sorted(facilities.items()):
            try:
                rounds = _rounds(entry["history"])
                delta = float(entry["delta"])
                spent = epsilon(rounds, delta=delta, accountant=accountant)
                following = next_round_epsilon(rounds, rounds[-1], delta=delta, accountant=accountant) if rounds else None
            except (KeyError, TypeError, ValueError, PrivacyError) as error:
                problems.append(f"{where}.{name}: unreadable: {error}")
                continue
            if not _close(entry.get("epsilon"), spent):
                problems.append(f"{where}.{name}: epsilon {entry.get('epsilon')!r} is not the accountant's {spent!r} "
                                "for its recorded parameters")  # fmt: skip
            if not _close(entry.get("next_round_epsilon"), following):
                problems.append(f"{where}.{name}: next_round_epsilon {entry.get('next_round_epsilon')!r} is not {following!r}")
    return problems
