"""Reading a facility's evaluation.json on the aggregation side: untrusted, so bounded and
checked; every refusal names the facility and the field."""

from __future__ import annotations

import json

import pytest

from xffl_tasks.evaluate.result import (
    MAX_EVALUATION_BYTES,
    EvaluationFileError,
    parse_evaluation,
    read_evaluation,
)


def document(**changes):
    data = {
        "format": "xffl-evaluation", "version": 1, "seq_len": 64, "seed": 0,
        "candidates": {"last": {"val_loss": 2.5, "val_tokens": 630, "val_sequences": 10, "model": "/m"},
                       "release": {"val_loss": 2.75, "val_tokens": 630, "val_sequences": 10}},
        "versions": {"torch": "2.13.0"},
    }  # fmt: skip
    data.update(changes)
    return data


def encoded(data) -> bytes:
    return json.dumps(data).encode()


def test_a_good_file_reads(tmp_path):
    (tmp_path / "evaluation.json").write_bytes(encoded(document()))
    evaluation = read_evaluation(tmp_path, "italy", expected=("last", "release"))
    assert evaluation.facility == "italy" and evaluation.seq_len == 64 and evaluation.seed == 0
    assert evaluation.candidates["last"].val_loss == 2.5
    assert evaluation.candidates["release"].val_tokens == 630
    assert read_evaluation(tmp_path / "evaluation.json", "italy").candidates.keys() == {
        "last",
        "release",
    }


def last(**entry):
    return {"last": {"val_loss": 2.5, "val_tokens": 630, "val_sequences": 10, **entry}}


@pytest.mark.parametrize(
    "data, field, problem",
    [
        (b"[" * 10 + b"]" * 10, None, "nests deeper"),
        (b" " * (MAX_EVALUATION_BYTES + 1), None, "larger than"),
        (b'{"a": 1, "a": 2}', None, "appears twice"),
        (b"\xff", None, "not UTF-8"),
        (b"[]", None, "not a JSON object"),
        (encoded(document(format="other")), "format", "is not 'xffl-evaluation'"),
        (encoded(document(candidates={})), "candidates", "1 to 16"),
        (encoded(document(candidates={f"c{i}": {} for i in range(17)})), "candidates", "1 to 16"),
        (encoded(document(candidates={"../x": {}})), "candidates", "not a candidate name"),
        (encoded(document(candidates={"last": 3})), "candidates.last", "not an object"),
        (encoded(document(candidates=last(val_loss=float("nan")))), "candidates.last.val_loss", "finite"),
        (encoded(document(candidates=last(val_loss=1e7))), "candidates.last.val_loss", "from -1e+06 to 1e+06"),
        (encoded(document(candidates=last(val_loss="2.5"))), "candidates.last.val_loss", "not a number"),
        (encoded(document(candidates=last(val_tokens=0))), "candidates.last.val_tokens", "whole number from 1"),
        (encoded(document(candidates=last(val_sequences=True))), "candidates.last.val_sequences", "whole number"),
        (encoded(document(candidates=last(val_tokens=10**30))), None, "digits"),
        (encoded(document(seq_len=1)), "seq_len", "whole number from 2"),
        (encoded(document(seed=-1)), "seed", "whole number from 0"),
    ],
)  # fmt: skip
def test_bad_files_are_refused_naming_the_facility_and_field(data, field, problem):
    with pytest.raises(EvaluationFileError) as caught:
        parse_evaluation(data, "italy")
    assert caught.value.facility == "italy" and caught.value.field == field
    assert str(caught.value).startswith(f"facility 'italy': evaluation.json {field or ''}".rstrip())
    assert problem in str(caught.value)


def test_an_expected_candidate_must_be_there(tmp_path):
    with pytest.raises(
        EvaluationFileError, match=r"candidates.best is missing \(found last, release\)"
    ):
        parse_evaluation(encoded(document()), "italy", expected=("best",))
    with pytest.raises(EvaluationFileError, match="cannot be read"):
        read_evaluation(tmp_path, "italy")
