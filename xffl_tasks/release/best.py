"""Which global model of a campaign to release: the one with the best validation loss.

Facilities evaluate the global model they receive before they train, so round r's manifest
holds, as ``weighted_val_loss``, the sample-weighted validation loss of the global model that
round r-1 produced; the last round's global model is evaluated after the campaign stops (the
final evaluation, :class:`FinalEvaluation`). So the global model of round r has the loss
``manifests[r + 1].weighted_val_loss``, and the last one the final evaluation's. Round 0's
``weighted_val_loss`` is the loss of the model the campaign started from: recorded as
``input_loss``, never a candidate.

:func:`choose_best_round` picks the lowest loss (a tie goes to the earlier round; rounds with
no loss are skipped) and says why in a :class:`Selection`; :func:`check_selection` recomputes a
recorded choice from the chain (what ``python -m xffl_tasks.verify`` runs on a release). Pure:
plain data in, typed values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xffl_tasks.evaluate.result import FacilityEvaluation, losses_of
from xffl_tasks.release.errors import SelectionError

FORMAT = "xffl-selection"
VERSION = 1
RULE = (
    "the lowest sample-weighted validation loss among the campaign's global models "
    "(a tie goes to the earlier round; rounds with no loss are skipped)"
)
FINAL = "final evaluation"
#: How close a recorded and a recomputed final loss must be (the sum's order may differ).
REL_TOL = 1e-12


def _number(value: object) -> float | None:
    """A finite number as a float; None for anything else (no loss)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def weighted_mean(losses: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """The manifests' rule: the weighted mean of the finite losses (facilities in name order)."""
    total = weight_sum = 0.0
    for name in sorted(losses):
        loss, weight = _number(losses[name]), _number(weights.get(name, 0.0))
        if loss is None or weight is None or weight <= 0:
            continue
        total += weight * loss
        weight_sum += weight
    return total / weight_sum if weight_sum > 0 else None


@dataclass(frozen=True)
class FinalEvaluation:
    """The last global model's loss from the final evaluation: each facility's loss of
    ``candidate`` in its evaluation.json, the weights, and their weighted mean."""

    weighted_val_loss: float | None
    candidate: str = "last"
    losses: Mapping[str, float] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "weighted_val_loss": self.weighted_val_loss,
                "losses": dict(sorted(self.losses.items())), "weights": dict(sorted(self.weights.items()))}  # fmt: skip

    @classmethod
    def from_dict(cls, data: object, *, where: str) -> FinalEvaluation:
        if not isinstance(data, Mapping):
            raise SelectionError(f"{where}: is not an object")
        maps = {}
        for key in ("losses", "weights"):
            value = data.get(key, {})
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and _number(v) is not None for k, v in value.items()
            ):
                raise SelectionError(f"{where}.{key}: is not a map of facility names to numbers")
            maps[key] = {k: float(v) for k, v in value.items()}
        loss = data.get("weighted_val_loss")
        if loss is not None and _number(loss) is None:
            raise SelectionError(f"{where}.weighted_val_loss: {loss!r} is not a finite number")
        candidate = data.get("candidate", "last")
        if not isinstance(candidate, str):
            raise SelectionError(f"{where}.candidate: is not a string")
        return cls(_number(loss), candidate, maps["losses"], maps["weights"])


def final_evaluation(
    evaluations: Mapping[str, FacilityEvaluation],
    weights: Mapping[str, float],
    candidate: str = "last",
) -> FinalEvaluation:
    """The final evaluation's record for ``candidate``: each facility's loss (its checked
    evaluation.json) and their weighted mean with ``weights`` (the last manifest's ``weights``,
    as its ``weighted_val_loss`` used)."""
    losses = losses_of(evaluations, candidate)
    used = {name: float(weights[name]) for name in sorted(losses) if name in weights}
    return FinalEvaluation(weighted_mean(losses, used), candidate, losses, used)


@dataclass(frozen=True)
class RoundCandidate:
    """A global model and its loss (None: not known), and where the loss comes from."""

    round: int
    loss: float | None
    source: str


@dataclass(frozen=True)
class Selection:
    """The chosen global model (``round``, ``loss``), every candidate's loss, and why."""

    campaign: str
    round: int
    loss: float
    candidates: tuple[RoundCandidate, ...]
    reason: str
    input_loss: float | None = None
    final_evaluation: FinalEvaluation | None = None
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "campaign": self.campaign, "round": self.round,
            "loss": self.loss, "rule": self.rule, "reason": self.reason, "input_loss": self.input_loss,
            "candidates": [{"round": c.round, "loss": c.loss, "source": c.source} for c in self.candidates],
            "final_evaluation": self.final_evaluation.to_dict() if self.final_evaluation else None,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: object, *, where: str = "selection") -> Selection:
        """A recorded selection, checked; SelectionError naming ``where`` and the field."""
        if not isinstance(data, Mapping):
            raise SelectionError(f"{where}: is not an object")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise SelectionError(f"{where}: is not {FORMAT!r} version {VERSION}")
        campaign, number, loss = data.get("campaign"), data.get("round"), _number(data.get("loss"))
        if not isinstance(campaign, str) or not campaign:
            raise SelectionError(f"{where}.campaign: is not a campaign name")
        if not _whole(number):
            raise SelectionError(f"{where}.round: {number!r} is not a round number")
        if loss is None:
            raise SelectionError(f"{where}.loss: {data.get('loss')!r} is not a finite number")
        entries = data.get("candidates")
        if not isinstance(entries, list):
            raise SelectionError(f"{where}.candidates: is not a list")
        candidates = []
        for index, entry in enumerate(entries):
            inner = f"{where}.candidates[{index}]"
            if not isinstance(entry, Mapping) or not _whole(entry.get("round")):
                raise SelectionError(f"{inner}: is not an object with a round number")
            if entry.get("loss") is not None and _number(entry.get("loss")) is None:
                raise SelectionError(f"{inner}.loss: {entry.get('loss')!r} is not a finite number")
            candidates.append(
                RoundCandidate(
                    entry["round"], _number(entry.get("loss")), str(entry.get("source", ""))
                )
            )
        final = data.get("final_evaluation")
        return cls(
            campaign=campaign, round=number, loss=loss, candidates=tuple(candidates),
            reason=str(data.get("reason", "")), input_loss=_number(data.get("input_loss")),
            final_evaluation=None if final is None else FinalEvaluation.from_dict(final, where=f"{where}.final_evaluation"),
            rule=str(data.get("rule", RULE)),
        )  # fmt: skip


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rounds(manifests: Sequence[Mapping[str, Any]]) -> tuple[str, list[int]]:
    if not manifests:
        raise SelectionError("manifests: the campaign has no rounds")
    numbers = []
    campaign = manifests[0].get("campaign")
    for index, manifest in enumerate(manifests):
        number = manifest.get("round") if isinstance(manifest, Mapping) else None
        if not _whole(number):
            raise SelectionError(f"manifests[{index}].round: {number!r} is not a round number")
        if numbers and number != numbers[-1] + 1:
            raise SelectionError(
                f"manifests[{index}].round: {number} does not follow round {numbers[-1]}"
            )
        if manifest.get("campaign") != campaign:
            raise SelectionError(
                f"manifests[{index}].campaign: {manifest.get('campaign')!r}, not {campaign!r}"
            )
        numbers.append(number)
    if not isinstance(campaign, str) or not campaign:
        raise SelectionError(f"manifests[0].campaign: {campaign!r} is not a campaign name")
    return campaign, numbers


def round_candidates(
    manifests: Sequence[Mapping[str, Any]], final_loss: float | None
) -> tuple[RoundCandidate, ...]:
    """Each global model's loss, in round order: the next manifest's ``weighted_val_loss``,
    the last one's ``final_loss``."""
    _, numbers = _rounds(manifests)
    found = []
    for index, number in enumerate(numbers):
        if index + 1 < len(manifests):
            loss = _number(manifests[index + 1].get("weighted_val_loss"))
            source = f"round {numbers[index + 1]} manifest weighted_val_loss"
        else:
            loss, source = _number(final_loss), FINAL
        found.append(RoundCandidate(number, loss, source))
    return tuple(found)


def _explain(chosen: RoundCandidate, candidates: Sequence[RoundCandidate]) -> str:
    known = [c for c in candidates if c.loss is not None]
    last = candidates[-1]
    text = (f"round {chosen.round}{' (the last)' if chosen is last else ''} has the lowest sample-weighted "
            f"validation loss, {chosen.loss:.6f} ({chosen.source}), of {len(known)} round(s) with a loss")  # fmt: skip
    if chosen is not last:
        if last.loss is None:
            text += f"; the last round ({last.round}) has no loss"
        else:
            text += f"; the last round ({last.round}) has {last.loss:.6f} (+{last.loss - chosen.loss:.6f})"
    ties = [c.round for c in known if c.loss == chosen.loss and c is not chosen]
    if ties:
        text += f"; round(s) {', '.join(map(str, ties))} tie with it: the earlier round is kept"
    skipped = [c.round for c in candidates if c.loss is None]
    if skipped:
        text += f"; round(s) {', '.join(map(str, skipped))} have no loss and were skipped"
    return text


def choose_best_round(
    manifests: Sequence[Mapping[str, Any]], final: FinalEvaluation | float | None
) -> Selection:
    """The global model with the lowest loss among the campaign's rounds (``manifests`` in
    round order, from round 0; ``final``: the last global model's final evaluation, or its
    weighted loss). SelectionError when the rounds do not follow or no round has a loss."""
    if not isinstance(final, FinalEvaluation):
        final = None if final is None else FinalEvaluation(_number(final))
    campaign, _ = _rounds(manifests)
    candidates = round_candidates(manifests, final.weighted_val_loss if final else None)
    chosen = None
    for candidate in candidates:
        if candidate.loss is not None and (chosen is None or candidate.loss < chosen.loss):
            chosen = candidate
    if chosen is None:
        raise SelectionError(
            f"campaign {campaign}: no global model has a validation loss (neither the manifests "
            "nor the final evaluation hold one)"
        )
    return Selection(
        campaign=campaign, round=chosen.round, loss=float(chosen.loss), candidates=candidates,
        reason=_explain(chosen, candidates), input_loss=_number(manifests[0].get("weighted_val_loss")),
        final_evaluation=final,
    )  # fmt: skip


def check_selection(
    manifests: Sequence[Mapping[str, Any]], recorded: Selection | Mapping[str, Any]
) -> list[str]:
    """Recomputes the choice from the chain and the recorded final evaluation; the problems
    (empty: the recorded choice is the chain's)."""
    try:
        if not isinstance(recorded, Selection):
            recorded = Selection.from_dict(recorded)
        final = recorded.final_evaluation
        problems = []
        if final is not None and final.losses:
            again = weighted_mean(final.losses, final.weights)
            if (again is None) != (final.weighted_val_loss is None) or (
                again is not None
                and not math.isclose(again, final.weighted_val_loss, rel_tol=REL_TOL)
            ):
                problems.append(f"selection: the final evaluation's weighted_val_loss {final.weighted_val_loss!r} "
                                f"is not the weighted mean of its losses ({again!r})")  # fmt: skip
        expected = choose_best_round(manifests, final)
    except SelectionError as error:
        text = str(error)
        return [text if text.startswith("selection") else f"selection: {text}"]
    if recorded.campaign != expected.campaign:
        problems.append(
            f"selection: records campaign {recorded.campaign!r}, the chain is {expected.campaign!r}"
        )
    if recorded.candidates != expected.candidates:
        theirs = {c.round: c.loss for c in recorded.candidates}
        ours = {c.round: c.loss for c in expected.candidates}
        differ = sorted(r for r in ours.keys() | theirs.keys() if ours.get(r) != theirs.get(r))
        problems.append(f"selection: the recorded round losses differ from the chain's at round(s) "
                        f"{', '.join(map(str, differ)) or '(sources)'}")  # fmt: skip
    if (recorded.round, recorded.loss) != (expected.round, expected.loss):
        problems.append(f"selection: records round {recorded.round} (loss {recorded.loss!r}); the chain gives "
                        f"round {expected.round} (loss {expected.loss!r})")  # fmt: skip
    return problems
