"""Names that travel to a facility and back, and splitting a facility's output (pure)."""

from __future__ import annotations

import sys

import pytest
from xffl_airflow.remote_text import (
    LINE_BREAKS,
    RemoteNameError,
    check_remote_name,
    describe,
    split_lines,
)

REASON = "names must not hold line breaks, NUL, other control characters or backslashes"


def test_line_breaks_are_every_separator_of_splitlines_and_nul():
    splitting = {chr(i) for i in range(sys.maxunicode + 1) if len(f"a{chr(i)}b".splitlines()) > 1}
    assert splitting == set("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
    assert LINE_BREAKS == splitting | {"\x00"}


@pytest.mark.parametrize(
    "name",
    [
        "/scratch/xffl/round-3/model.safetensors",
        "/w/it's a model/x y.bin",  # quoted wherever it reaches a shell
        "a;b|c&d$(e)`f`*?[g]~<h>",
        "modèle-日本.bin",
        "no-break\u00a0space.bin",
    ],
)
def test_names_that_travel_are_returned_as_given(name):
    assert check_remote_name(name, "file name") == name


@pytest.mark.parametrize("char", sorted(LINE_BREAKS))
def test_every_line_break_is_refused(char):
    with pytest.raises(RemoteNameError) as caught:
        check_remote_name(f"model{char}x.bin", "file name")
    assert caught.value.char == char and caught.value.what == "file name"
    assert str(caught.value) == (
        f"file name {f'model{char}x.bin'!r} holds {describe(char)}: {REASON}"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("m\u2028x.bin", r"file name 'm\u2028x.bin' holds U+2028 (LINE SEPARATOR): " + REASON),
        ("m\x85x.bin", r"file name 'm\x85x.bin' holds U+0085 (NEXT LINE): " + REASON),
        ("m\x00x.bin", r"file name 'm\x00x.bin' holds U+0000 (NUL): " + REASON),
        ("m\tx.bin", r"file name 'm\tx.bin' holds U+0009 (a control character): " + REASON),
        ("m\x1bx.bin", r"file name 'm\x1bx.bin' holds U+001B (a control character): " + REASON),
        ("m\x7fx.bin", r"file name 'm\x7fx.bin' holds U+007F (a control character): " + REASON),
        ("m\x9bx.bin", r"file name 'm\x9bx.bin' holds U+009B (a control character): " + REASON),
        ("m\ud800x.bin", r"file name 'm\ud800x.bin' holds U+D800 (a lone surrogate): " + REASON),
        (
            "m\u202ex.bin",
            r"file name 'm\u202ex.bin' holds U+202E (RIGHT-TO-LEFT OVERRIDE): " + REASON,
        ),
        ("m\\x.bin", r"file name 'm\\x.bin' holds U+005C (REVERSE SOLIDUS): " + REASON),
    ],
)
def test_refusals_show_the_character(name, message):
    with pytest.raises(ValueError) as caught:
        check_remote_name(name, "file name")
    assert str(caught.value) == message
    assert caught.value.detail == message.removeprefix("file name ")


def test_a_name_must_be_a_string():
    with pytest.raises(TypeError, match="remote path must be a string, got bytes"):
        check_remote_name(b"/w/m", "remote path")


def test_facility_output_is_split_on_newline_only():
    text = "a\x85b\u2028c\x1cd\r\nlast\n"
    assert text.splitlines() == ["a", "b", "c", "d", "last"]
    assert split_lines(text) == ["a\x85b\u2028c\x1cd", "last"]
    assert split_lines("") == [] and split_lines("\n") == [""] and split_lines("x") == ["x"]
