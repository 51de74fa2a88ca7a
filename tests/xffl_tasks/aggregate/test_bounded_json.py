"""The one bounded JSON reader of a facility's files: every failure a JSONError, on literal bytes.

Issue 22: unclosed brackets raised RecursionError, a 5000-digit integer ValueError, and a lone
surrogate escape passed our checks though the safetensors library refuses it. Starts nothing.
"""

from __future__ import annotations

import math

import pytest

from xffl_tasks.aggregate.bounded_json import JSONError, load_json, nesting_problem


def load(data: bytes, depth: int = 3) -> object:
    return load_json(data, max_bytes=1 << 20, max_depth=depth)


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        (b"{}", 1, None),
        (b'{"a": [1, [2]]}', 3, None),
        (b'{"a": [1, [2]]}', 2, "nests deeper than 2 levels"),
        (b'{"a": "[[[[[["}', 1, None),  # brackets in strings are text
        (b'{"a\\"[[": 1}', 1, None),  # an escaped quote does not end the string
        (b"[" * 200_000, 3, "is not valid JSON (its brackets do not balance)"),
        (b"[" * 200_000 + b"]" * 200_000, 3, "nests deeper than 3 levels"),
        (b'{"a": ', 3, "is not valid JSON (its brackets do not balance)"),
        (b"]]][[[", 3, "is not valid JSON (its brackets do not balance)"),
        # strings holding closing brackets do not hide the nesting around them
        (b'["]",["]",["]",["]"]]]]', 3, "nests deeper than 3 levels"),
    ],
)
def test_nesting_is_measured_before_parsing(text, limit, expected):
    assert nesting_problem(text, limit) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[" * 100_000, "is not valid JSON (its brackets do not balance)"),
        (b'{"a": [[[[1]]]]}', "nests deeper than 3 levels"),
        (
            b"[1, " + b"9" * 5000 + b"]",
            "is not valid JSON (an integer of 5000 digits, more than 20)",
        ),
        (b'{"a": "\\ud800"}', "has a lone surrogate escape in the string '\\ud800'"),
        (b'{"\\udfff": 1}', "has a lone surrogate escape in the string '\\udfff'"),
        (b'["\\ude00\\ud83d"]', "has a lone surrogate escape"),  # a pair in the wrong order
        (b'{"a": 1, "a": 2}', "key 'a' appears twice in one object"),
        (b'{"x": {"a": 1, "a": 1}}', "key 'a' appears twice in one object"),
        (b"\xef\xbb\xbf{}", "is not valid JSON (Unexpected UTF-8 BOM"),
        (b'{"a": "\xed\xa0\x80"}', "is not UTF-8 (invalid continuation byte at byte 7)"),
        (b'{"a": "\xc0\xaf"}', "is not UTF-8 (invalid start byte at byte 7)"),
        (b'{"a": 1} x', "is not valid JSON (Extra data at character 9)"),
        (b"x" * ((1 << 20) + 1), "is larger than 1048576 bytes"),
    ],
)
def test_every_failure_is_a_json_error_saying_what(data, message):
    with pytest.raises(JSONError) as raised:
        load(data)
    assert str(raised.value).startswith(message), str(raised.value)


def test_what_python_and_serde_json_both_read_is_read_alike():
    assert load(b'{"a": ["\\ud83d\\ude00", "\\u00e9"], "b": -12, "c": 0.5}') == {
        "a": ["\U0001f600", "é"],
        "b": -12,
        "c": 0.5,
    }
    assert load(b"18446744073709551615") == 2**64 - 1  # 20 digits: every size of ours
    minus_zero = load(b"-0")  # serde_json reads -0 as a float, and so do we
    assert isinstance(minus_zero, float) and math.copysign(1.0, minus_zero) == -1.0


def test_constants_and_overflowing_numbers_are_left_to_the_schemas():
    value = load(b"[NaN, Infinity, 1e999]")
    assert math.isnan(value[0]) and value[1] == math.inf and value[2] == math.inf
