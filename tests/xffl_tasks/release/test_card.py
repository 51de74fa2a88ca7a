"""The model card and the release comparison: deterministic text from the manifests."""

from __future__ import annotations

import pytest

from xffl_tasks.release.best import FinalEvaluation, choose_best_round
from xffl_tasks.release.card import render_card
from xffl_tasks.release.chain import read_campaign
from xffl_tasks.release.compare import ReleaseComparison, compare_to_release
from xffl_tasks.release.errors import ReleaseError

from .conftest import make_campaign


def test_the_comparison_passes_by_the_margin():
    first = compare_to_release(2.0, None, margin=0.05)
    assert (
        first.passes
        and first.improvement is None
        and first.reason == "there is no previous release"
    )
    better = compare_to_release(2.0, 2.1, margin=0.05, previous_release=3)
    assert better.passes and better.improvement == pytest.approx(0.1)
    assert better.reason.startswith("improves on release 3 by 0.100000 (2.100000 -> 2.000000)")
    worse = compare_to_release(2.0, 2.01, margin=0.05)
    assert not worse.passes and worse.reason.endswith("below the margin")
    regressed = compare_to_release(2.5, 2.0, margin=0.0, previous_release=1)
    assert not regressed.passes and regressed.reason.startswith("is worse than release 1 by 0.500000 (2.000000 -> 2.500000)")
    assert ReleaseComparison.from_dict(better.to_dict()) == better
    with pytest.raises(ReleaseError, match="margin"):
        compare_to_release(2.0, 2.1, margin=-1)
    with pytest.raises(ReleaseError, match="candidate_loss"):
        compare_to_release(float("inf"), 2.1)


def card_of(campaign, **extra):
    chain = read_campaign(campaign)
    final = FinalEvaluation(
        2.2, "last", {"italy": 2.1, "czechia": 2.5}, {"italy": 0.75, "czechia": 0.25}
    )
    selection = choose_best_round(chain.manifests, final)
    return render_card(
        federation="demo", manifests=chain.manifests, final_manifest_sha256=chain.final_sha256,
        selection=selection, base_model="/models/tiny-llama",
        facilities={"italy": "Italian news | 2k documents", "czechia": "Czech\nforum posts"}, **extra,
    )  # fmt: skip


def test_the_card_shows_the_campaign_the_curve_and_the_choice(campaign):
    comparison = compare_to_release(2.0, 2.1, margin=0.05, previous_release=1)
    card = card_of(campaign, comparison=comparison)
    assert card == card_of(campaign, comparison=comparison)  # deterministic
    assert card.startswith("# demo: campaign c1, round 1\n")
    assert "- Base model: `/models/tiny-llama`" in card
    assert "- Aggregation strategy: fedavg" in card
    assert "- Rounds: 4 (0 to 3), 2026-01-01T10:00:00+00:00 to 2026-01-04T11:00:00+00:00" in card
    assert "| italy | Italian news \\| 2k documents | 4 of 4 |" in card
    assert "| czechia | Czech forum posts | 4 of 4 |" in card
    assert "| start | 2 | 3.000000 | the model the campaign started from |" in card
    assert "| 1 (selected) | 2 | 2.000000 | round 2 manifest weighted_val_loss |" in card
    assert "| 3 | 2 | 2.200000 | final evaluation |" in card
    assert "Round 1 has the lowest sample-weighted validation loss" in card
    assert "- Verdict: improves on release 1 by 0.100000" in card
    assert "required margin: 0.050000" in card
    assert read_campaign(campaign).final_sha256 in card
    assert "Privacy" not in card
    assert "LoRA" not in card and "full model (`model/`)" in card


def test_a_privacy_ledger_is_rendered_when_the_manifests_hold_one(tmp_path):
    privacy = [
        None,
        {"epsilon": 0.5, "delta": 1e-5, "accountant": {"kind": "rdp"}},
        {"epsilon": 1.0, "delta": 1e-5},
    ]
    campaign = make_campaign(tmp_path, [3.0, 2.5, 2.4], privacy=privacy)
    card = card_of(campaign)
    assert "## Privacy ledger" in card
    assert "| Round | accountant.kind | delta | epsilon |" in card
    assert "| 1 | rdp | 1e-05 | 0.5 |" in card and "| 2 | - | 1e-05 | 1 |" in card
    assert "No comparison was recorded." in card
