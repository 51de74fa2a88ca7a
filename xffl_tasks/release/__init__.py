"""Releases people can trust: choose a campaign's best global model, describe it, publish it
as a numbered, read-only, hash-chained folder, and verify it (see docs/release.md).

- :mod:`~xffl_tasks.release.best`: the best round from the manifests and the final evaluation;
- :mod:`~xffl_tasks.release.compare`: the candidate against the previous release;
- :mod:`~xffl_tasks.release.card`: the model card (README.md);
- :mod:`~xffl_tasks.release.publish`: ``<releases_root>/<federation>/<n>/``;
- :mod:`~xffl_tasks.release.verify`: what ``python -m xffl_tasks.verify RELEASE_DIR`` checks.

No torch is imported here (the LoRA merge loads it when a release is published).
"""

from __future__ import annotations

from xffl_tasks.release.best import (
    FinalEvaluation,
    RoundCandidate,
    Selection,
    check_selection,
    choose_best_round,
    final_evaluation,
)
from xffl_tasks.release.card import render_card
from xffl_tasks.release.chain import CampaignChain, read_campaign
from xffl_tasks.release.compare import ReleaseComparison, compare_to_release
from xffl_tasks.release.errors import ReleaseError, SelectionError
from xffl_tasks.release.publish import RELEASE_FILE, publish_release, release_numbers
from xffl_tasks.release.verify import is_release_folder, verify_release, verify_releases

__all__ = [
    "RELEASE_FILE", "CampaignChain", "FinalEvaluation", "ReleaseComparison", "ReleaseError",
    "RoundCandidate", "Selection", "SelectionError", "check_selection", "choose_best_round",
    "compare_to_release", "final_evaluation", "is_release_folder", "publish_release",
    "read_campaign", "release_numbers", "render_card", "verify_release", "verify_releases",
]  # fmt: skip
