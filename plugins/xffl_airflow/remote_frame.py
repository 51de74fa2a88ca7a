"""Framing a remote command's output, so that a login shell's own output cannot be mistaken for it.

Real login nodes print on every shell, non-interactive ones included: a message of the day,
quota notices, module messages, a terminal-title escape sequence; on stdout or stderr, with or
without a trailing newline, before our command runs and (``.bash_logout``) after it. Every
command we run over an exec channel is wrapped by :func:`frame_command`: it prints a marker
line with a fresh nonce before and after the command's output, on both streams, and the
command's exit status in the closing marker. :func:`unframe` keeps only what lies between the
markers and reports the rest as noise (logged once per facility at debug level by the caller).

The command runs in a subshell of the login shell (so that ``exit`` inside it still lets the
closing marker print) and the syntax is POSIX: sh, bash, dash, ksh and zsh login shells work.
Pure functions: tested on literal outputs in ``tests/plugins/xffl_airflow/test_remote_frame.py``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

PREFIX = "@@xffl-frame"
NONCE = re.compile(r"^[0-9a-f]{16}$")


class FrameError(RuntimeError):
    """The framed output is incomplete: the command never started, or its output was cut."""

    def __init__(self, message: str, *, noise: bytes = b""):
        super().__init__(message)
        self.noise = noise


def new_nonce() -> str:
    return secrets.token_hex(8)


def _markers(nonce: str) -> tuple[bytes, bytes]:
    if not NONCE.fullmatch(nonce):
        raise ValueError(f"nonce must be 16 hex digits, got {nonce!r}")
    return f"{PREFIX}:{nonce}:begin".encode(), f"{PREFIX}:{nonce}:end".encode()


def frame_command(command: str, nonce: str) -> str:
    """``command`` wrapped in begin/end markers on stdout and stderr; the exit status is kept."""
    begin, end = (m.decode() for m in _markers(nonce))
    return (
        f"printf '\\n%s\\n' '{begin}'; printf '\\n%s\\n' '{begin}' >&2; "
        f"( {command}\n); __xffl_rc=$?; "
        f"printf '\\n%s %d\\n' '{end}' \"$__xffl_rc\"; printf '\\n%s\\n' '{end}' >&2; "
        'exit "$__xffl_rc"'
    )


@dataclass(frozen=True)
class Framed:
    """What the command itself printed, its exit status, and what the shell printed around it."""

    stdout: bytes
    stderr: bytes
    exit_status: int | None
    noise: bytes  # the shell's own output, both streams, before and after

    @property
    def noisy(self) -> bool:
        return bool(self.noise.strip())


def _between(data: bytes, begin: bytes, end: bytes, stream: str) -> tuple[bytes, bytes, bytes | None]:
    """(body, noise, text after the end marker on its line); raises FrameError when incomplete."""
    start = data.find(b"\n" + begin + b"\n")
    if start < 0:
        raise FrameError(
            f"the command did not start (no begin marker on {stream}); the shell printed {first_bytes(data)}",
            noise=data,
        )
    body_from = start + len(begin) + 2
    stop = data.rfind(b"\n" + end)
    if stop < body_from - 1:
        raise FrameError(
            f"the command's output on {stream} was cut before its end marker "
            "(the command was killed, timed out or the connection dropped)",
            noise=data[:start],
        )
    line_end = data.find(b"\n", stop + 1 + len(end))
    line_end = len(data) if line_end < 0 else line_end
    tail = data[stop + 1 + len(end) : line_end]
    noise = data[:start] + data[line_end + 1 :]
    return data[body_from:stop], noise, tail


def unframe(stdout: bytes, stderr: bytes, nonce: str) -> Framed:
    """Splits a framed command's streams into its own output and the shell's noise."""
    begin, end = _markers(nonce)
    out, out_noise, tail = _between(stdout, begin, end, "stdout")
    try:
        err, err_noise, _ = _between(stderr, begin, end, "stderr")
    except FrameError:
        # stderr can lose its markers where a site's shell closes or redirects it; the command's
        # stdout frame is what counts, and stderr is then kept whole (for error messages)
        err, err_noise = stderr, b""
    status: int | None = None
    match = re.fullmatch(rb" (-?\d{1,5})", tail or b"")
    if match:
        status = int(match.group(1))
    return Framed(out, err, status, out_noise + err_noise)


def first_bytes(data: bytes, limit: int = 120) -> str:
    """The first bytes of ``data`` as a readable, escaped, bounded string."""
    if not data:
        return "nothing"
    shown = repr(data[:limit])[2:-1]
    return f"'{shown}'" + (f" (and {len(data) - limit} bytes more)" if len(data) > limit else "")
