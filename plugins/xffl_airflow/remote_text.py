"""Names that travel to a facility's shell, and text that comes back from it. Pure functions.

Every name we put in a remote command is ``shlex.quote``-d (``transfer.commands``,
``slurm.commands``), so spaces, quotes, ``$`` or ``;`` in a name are harmless there: no
shell metacharacter is refused here. What quoting cannot protect is what comes *back*:
hashing tools echo the file name, Slurm echoes names and paths, and we read that output line by
line. So a name must not hold

- a line break: any character on which Python's ``str.splitlines`` splits (``LINE_BREAKS``),
  and NUL, which ends a C string (argv, SFTP paths);
- any other control character (C0, DEL, C1), lone surrogate or bidirectional override: they
  rewrite terminal lines and log lines, so the name read there is not the name used;
- a backslash: ``sha256sum`` escapes names holding one, so its output no longer shows the name.

Output of a facility is split on ``"\\n"`` only (``split_lines``): the other separators that
``splitlines`` honours may sit inside a field a user controls (a job's comment, a log path).
"""

from __future__ import annotations

import unicodedata

# Every c with len(f"a{c}b".splitlines()) > 1 (tests check the list is complete), and NUL.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\x00")
# Bidirectional embeddings, overrides and isolates: text after them is shown reordered.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Control characters (C0, DEL, C1), lone surrogates, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class RemoteNameError(ValueError):
    """A name cannot travel to a facility and back. The message names the field or file and
    shows the name with ``repr``, so the offending character is visible.

    :param what: the field or file the name came from ("file name", "remote path", "job_name")
    :param value: the name as given
    :param char: the first character refused

    ``detail`` is the message without ``what``, for errors that name the field themselves.
    """

    def __init__(self, what: str, value: str, char: str):
        self.detail = (
            f"{value!r} holds {describe(char)}: names must not hold line breaks, NUL, "
            "other control characters or backslashes"
        )
        super().__init__(f"{what} {self.detail}")
        self.what = what
        self.value = value
        self.char = char


_CONTROL_NAMES = {
    "\x00": "NUL", "\n": "LINE FEED", "\r": "CARRIAGE RETURN", "\v": "LINE TABULATION",
    "\f": "FORM FEED", "\x1c": "FILE SEPARATOR", "\x1d": "GROUP SEPARATOR",
    "\x1e": "RECORD SEPARATOR", "\x85": "NEXT LINE",
}  # fmt: skip


def describe(char: str) -> str:
    """``"U+2028 (LINE SEPARATOR)"``: a character as it reads in an error message."""
    name = (
        _CONTROL_NAMES.get(char)
        or unicodedata.name(char, "")
        or ("a lone surrogate" if unicodedata.category(char) == "Cs" else "a control character")
    )
    return f"U+{ord(char):04X} ({name})"


def refused_char(value: str) -> str | None:
    """The first character of ``value`` that a remote name must not hold, or None."""
    for char in value:
        if (
            char == "\\"
            or char in LINE_BREAKS
            or char in BIDI_CONTROLS
            or unicodedata.category(char) in _REFUSED_CATEGORIES
        ):
            return char
    return None


def check_remote_name(value: object, what: str) -> str:
    """``value`` if it is a string that can travel to a facility's shell and back; else
    ``RemoteNameError`` (a ValueError) naming ``what`` (a TypeError for a non-string)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    char = refused_char(value)
    if char is not None:
        raise RemoteNameError(what, value, char)
    return value


def split_lines(text: str) -> list[str]:
    """The lines of a facility's output: split on ``"\\n"`` only, one trailing ``"\\r"`` dropped
    from each line, no empty last line for a final newline. ``""`` has no lines."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
