"""Choosing the best round: hand-made manifests, hand-computed choices."""

from __future__ import annotations

import json

import pytest

from xffl_tasks.evaluate.result import parse_evaluation
from xffl_tasks.release.best import (
    FINAL,
    FinalEvaluation,
    Selection,
    check_selection,
    choose_best_round,
    final_evaluation,
)
from xffl_tasks.release.errors import SelectionError


def manifests(*losses):
    return [
        {"campaign": "c1", "round": r, "weighted_val_loss": loss} for r, loss in enumerate(losses)
    ]


def test_the_global_model_of_round_r_has_the_next_manifests_loss():
    chosen = choose_best_round(manifests(3.0, 2.5, 2.0, 2.1), 2.2)
    assert (chosen.round, chosen.loss, chosen.input_loss) == (1, 2.0, 3.0)
    assert [(c.round, c.loss) for c in chosen.candidates] == [
        (0, 2.5),
        (1, 2.0),
        (2, 2.1),
        (3, 2.2),
    ]
    assert chosen.candidates[0].source == "round 1 manifest weighted_val_loss"
    assert chosen.candidates[-1].source == FINAL
    assert chosen.reason == (
        "round 1 has the lowest sample-weighted validation loss, 2.000000 (round 2 manifest "
        "weighted_val_loss), of 4 round(s) with a loss; the last round (3) has 2.200000 (+0.200000)"
    )


def test_the_last_round_wins_with_the_final_evaluation():
    chosen = choose_best_round(manifests(3.0, 2.5), FinalEvaluation(2.4))
    assert (chosen.round, chosen.loss) == (1, 2.4)
    assert chosen.reason.startswith("round 1 (the last) has the lowest")


def test_a_tie_goes_to_the_earlier_round_and_rounds_without_a_loss_are_skipped():
    chosen = choose_best_round(manifests(3.0, None, 2.0, float("nan"), 2.0), 2.0)
    assert [(c.round, c.loss) for c in chosen.candidates] == [
        (0, None),
        (1, 2.0),
        (2, None),
        (3, 2.0),
        (4, 2.0),
    ]
    assert chosen.round == 1
    assert "round(s) 3, 4 tie with it: the earlier round is kept" in chosen.reason
    assert "round(s) 0, 2 have no loss and were skipped" in chosen.reason


def test_no_final_evaluation_leaves_the_last_round_out():
    chosen = choose_best_round(manifests(3.0, 2.5, 2.6), None)
    assert chosen.round == 0 and chosen.candidates[-1].loss is None
    assert "the last round (2) has no loss" in chosen.reason


def test_no_loss_at_all_or_broken_rounds_are_errors():
    with pytest.raises(SelectionError, match="no global model has a validation loss"):
        choose_best_round(manifests(3.0, None), None)
    with pytest.raises(SelectionError, match=r"manifests\[1\].round: 2 does not follow round 0"):
        choose_best_round([{"campaign": "c", "round": 0}, {"campaign": "c", "round": 2}], 1.0)
    with pytest.raises(SelectionError, match=r"manifests\[1\].campaign"):
        choose_best_round([{"campaign": "c", "round": 0}, {"campaign": "d", "round": 1}], 1.0)
    with pytest.raises(SelectionError, match="no rounds"):
        choose_best_round([], 1.0)


def evaluation(facility, loss):
    data = {"format": "xffl-evaluation", "version": 1, "seq_len": 64, "seed": 0,
            "candidates": {"last": {"val_loss": loss, "val_tokens": 630, "val_sequences": 10}}}  # fmt: skip
    return parse_evaluation(json.dumps(data).encode(), facility)


def test_the_final_evaluation_is_weighted_as_the_manifests_are():
    evaluations = {
        "italy": evaluation("italy", 2.0),
        "czechia": evaluation("czechia", 3.0),
        "spain": evaluation("spain", 9.0),
    }
    final = final_evaluation(evaluations, {"italy": 0.75, "czechia": 0.25})
    assert final.weighted_val_loss == pytest.approx(2.25)
    assert final.losses == {"czechia": 3.0, "italy": 2.0, "spain": 9.0}
    assert final.weights == {"czechia": 0.25, "italy": 0.75}  # spain has no weight: left out
    assert final_evaluation(evaluations, {}, candidate="last").weighted_val_loss is None


def test_a_selection_round_trips_and_its_check_recomputes_it():
    chain = manifests(3.0, 2.5, 2.0, 2.1)
    final = FinalEvaluation(
        2.25, "last", {"italy": 2.0, "czechia": 3.0}, {"italy": 0.75, "czechia": 0.25}
    )
    chosen = choose_best_round(chain, final)
    recorded = json.loads(json.dumps(chosen.to_dict()))
    assert Selection.from_dict(recorded) == chosen
    assert check_selection(chain, recorded) == [] and check_selection(chain, chosen) == []
    # a manifest changed after the choice: round 2's global model now looks best
    changed = manifests(3.0, 2.5, 2.0, 1.9)
    problems = check_selection(changed, recorded)
    assert any("round(s) 2" in p for p in problems) and any(
        "the chain gives round 2" in p for p in problems
    )
    # the recorded choice edited
    assert "the chain gives round 1" in " ".join(check_selection(chain, {**recorded, "round": 3}))
    # the final evaluation's mean does not follow from its losses
    forged = {
        **recorded,
        "final_evaluation": {**recorded["final_evaluation"], "weighted_val_loss": 1.0},
    }
    assert any("is not the weighted mean" in p for p in check_selection(chain, forged))
    assert check_selection(chain, {"format": "nope"}) == [
        "selection: is not 'xffl-selection' version 1"
    ]
