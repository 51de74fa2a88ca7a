"""The release gate's comparison: is the chosen model better than the last release?

Both losses are sample-weighted validation losses on the facilities' private validation data:
the chosen round's (``Selection.loss``) and the last release's model evaluated in the same final
evaluation (``--candidate release=DIR``). The candidate passes when there is no release yet,
or when it improves on it by at least ``margin`` (nats per token). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xffl_tasks.release.errors import ReleaseError


@dataclass(frozen=True)
class ReleaseComparison:
    """The candidate's loss against the previous release's, the margin asked for, and the verdict."""

    candidate_loss: float
    previous_release: int | None
    previous_loss: float | None
    margin: float
    improvement: float | None
    passes: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate_loss": self.candidate_loss, "previous_release": self.previous_release,
            "previous_loss": self.previous_loss, "margin": self.margin,
            "improvement": self.improvement, "passes": self.passes, "reason": self.reason,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleaseComparison:
        try:
            return compare_to_release(
                data["candidate_loss"], data.get("previous_loss"), margin=data["margin"],
                previous_release=data.get("previous_release"),
            )  # fmt: skip
        except (KeyError, TypeError) as error:
            raise ReleaseError(f"comparison: {error} is missing or ill-typed") from None


def _finite(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReleaseError(f"comparison: {field}: {value!r} is not a finite number")
    return float(value)


def compare_to_release(
    candidate_loss: float,
    previous_loss: float | None,
    *,
    margin: float = 0.0,
    previous_release: int | None = None,
) -> ReleaseComparison:
    """The comparison; ``previous_loss`` None: there is no previous release (it passes)."""
    candidate_loss = _finite(candidate_loss, "candidate_loss")
    margin = _finite(margin, "margin")
    if margin < 0:
        raise ReleaseError(f"comparison: margin: {margin!r} must be at least 0")
    if previous_loss is None:
        return ReleaseComparison(candidate_loss, previous_release, None, margin, None, True,
                                 "there is no previous release")  # fmt: skip
    previous_loss = _finite(previous_loss, "previous_loss")
    improvement = previous_loss - candidate_loss
    passes = improvement >= margin
    name = f"release {previous_release}" if previous_release is not None else "the previous release"
    if improvement > 0:
        verdict = f"improves on {name} by {improvement:.6f}"
    else:
        verdict = f"is worse than {name} by {-improvement:.6f}" if improvement < 0 else f"equals {name}"
    reason = (
        f"{verdict} ({previous_loss:.6f} -> {candidate_loss:.6f}); the margin is {margin:.6f}: "
        + ("passes" if passes else "below the margin")
    )
    return ReleaseComparison(
        candidate_loss, previous_release, previous_loss, margin, improvement, passes, reason
    )
