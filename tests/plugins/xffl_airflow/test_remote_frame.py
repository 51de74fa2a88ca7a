"""Framing remote commands: a login shell's output before or after, on either stream, with or
without a newline, is told apart from the command's own (literal outputs, and real shells)."""

from __future__ import annotations

import subprocess

import pytest
from xffl_airflow.remote_frame import FrameError, first_bytes, frame_command, unframe

NONCE = "0123456789abcdef"
B, E = b"@@xffl-frame:0123456789abcdef:begin", b"@@xffl-frame:0123456789abcdef:end"


def test_literal_output_with_noise_around_it():
    stdout = b"Welcome to Leonardo\nquota: 91% used" + b"\n" + B + b"\n" + b"12345;cluster\n" + b"\n" + E + b" 0\nbye\n"
    stderr = b"\x1b]0;login01\x07" + b"\n" + B + b"\n" + b"warning\n" + b"\n" + E + b"\n"
    framed = unframe(stdout, stderr, NONCE)
    assert framed.stdout == b"12345;cluster\n" and framed.stderr == b"warning\n"
    assert framed.exit_status == 0
    assert framed.noise == b"Welcome to Leonardo\nquota: 91% usedbye\n\x1b]0;login01\x07"


def test_output_that_imitates_a_marker_of_another_nonce_stays_output():
    fake = b"@@xffl-frame:ffffffffffffffff:end 0\n"
    stdout = b"\n" + B + b"\n" + fake + b"\n" + E + b" 7\n"
    framed = unframe(stdout, b"\n" + B + b"\n\n" + E + b"\n", NONCE)
    assert framed.stdout == fake and framed.exit_status == 7


def test_a_command_that_never_started_or_was_cut_is_an_error_showing_the_first_bytes():
    with pytest.raises(FrameError, match=r"did not start \(no begin marker on stdout\); the shell printed 'sh: 1: syntax error"):
        unframe(b"sh: 1: syntax error\n", b"", NONCE)
    with pytest.raises(FrameError, match="cut before its end marker"):
        unframe(b"\n" + B + b"\npartial output", b"", NONCE)


def test_stderr_without_markers_is_kept_whole():
    framed = unframe(b"\n" + B + b"\nok\n\n" + E + b" 0\n", b"stderr closed early", NONCE)
    assert framed.stdout == b"ok\n" and framed.stderr == b"stderr closed early"


def test_first_bytes_are_escaped_and_bounded():
    assert first_bytes(b"") == "nothing"
    assert first_bytes(b"\x1b[1mHi\n") == "'\\x1b[1mHi\\n'"
    assert first_bytes(b"x" * 200, limit=10) == "'xxxxxxxxxx' (and 190 bytes more)"


def test_the_nonce_is_checked():
    with pytest.raises(ValueError, match="16 hex digits"):
        frame_command("true", "'; rm -rf /; '")


@pytest.mark.parametrize(
    "startup",
    [
        "echo 'Message of the day'; echo 'Quota: 91%'",
        "printf 'no trailing newline'",
        "printf '\\033]0;user@login01\\007'",
        "echo 'module: loaded' >&2; printf 'partial' >&2",
        "",
    ],
)
@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_real_shells_with_startup_output(shell, startup):
    command = frame_command("echo out; printf 'no newline'; echo err >&2; exit 4", NONCE)
    done = subprocess.run([shell, "-c", f"{startup}\n{command}\necho 'logout noise'"], capture_output=True, timeout=10)
    framed = unframe(done.stdout, done.stderr, NONCE)
    assert (framed.stdout, framed.stderr, framed.exit_status) == (b"out\nno newline", b"err\n", 4)
    assert done.returncode == 4
