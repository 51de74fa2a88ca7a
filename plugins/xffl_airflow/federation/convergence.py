"""When does a campaign stop? Pure rules over the rounds so far.

The global model's validation loss is measured where the data is: each facility evaluates the
global model it receives before training on it (``val_loss_before`` in its metrics), so the loss
recorded at round r is that of the global model that round r-1 produced. The campaign's loss at
a round is the sample-weighted mean over the facilities that reported it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RoundOutcome:
    """What one finished round contributes to the convergence decision."""

    round: int
    weighted_val_loss: float | None
    global_update_norm: float | None


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    improvement: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def weighted_loss(losses: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """The weighted mean of the finite losses; None when no facility reported one."""
    total = weight_sum = 0.0
    for name, loss in losses.items():
        if loss is None or not math.isfinite(loss):
            continue
        weight = float(weights.get(name, 0.0))
        total += weight * loss
        weight_sum += weight
    return total / weight_sum if weight_sum > 0 else None


def decide(
    history: Sequence[RoundOutcome],
    *,
    max_rounds: int,
    min_improvement: float = 0.0,
    patience: int = 1,
    min_update_norm: float = 0.0,
) -> Decision:
    """Decides after the last round of ``history`` (rounds in order, the current one last).

    Stops when ``max_rounds`` rounds are done; when the global update norm fell below
    ``min_update_norm`` (0 disables); or when the weighted loss improved by less than
    ``min_improvement`` in each of the last ``patience`` rounds (0 disables).
    """
    if not history:
        raise ValueError("no rounds to decide on")
    current = history[-1]
    losses = [h.weighted_val_loss for h in history]
    improvement = None
    if len(losses) >= 2 and losses[-1] is not None and losses[-2] is not None:
        improvement = losses[-2] - losses[-1]
    if current.round + 1 >= max_rounds:
        return Decision(True, f"max_rounds reached ({max_rounds} rounds done)", improvement)
    if min_update_norm > 0 and current.global_update_norm is not None and current.global_update_norm < min_update_norm:
        return Decision(
            True, f"global update norm {current.global_update_norm:.6g} below min_update_norm {min_update_norm:g}", improvement
        )
    if min_improvement > 0 and len(losses) > patience:
        recent = losses[-(patience + 1):]
        if all(v is not None for v in recent):
            gains = [a - b for a, b in zip(recent, recent[1:], strict=False)]
            if all(g < min_improvement for g in gains):
                return Decision(
                    True,
                    f"weighted validation loss improved by less than {min_improvement:g} "
                    f"for {patience} round(s) (last: {gains[-1]:.6g})",
                    improvement,
                )
    return Decision(False, "continue", improvement)
