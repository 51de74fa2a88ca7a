"""A facility's login shell as the unit tests' fake SSH connections answer for it: they take
the framed command ``SlurmClient.run`` sends, and answer with literal output framed the way
the real wrapper prints it, with whatever noise a login shell adds before and after."""

from __future__ import annotations

import re
from types import SimpleNamespace

FRAMED = re.compile(
    r"^printf '\\n%s\\n' '@@xffl-frame:(?P<nonce>[0-9a-f]{16}):begin'; .*?; \( (?P<command>.*)\n\); "
    r"__xffl_rc=\$\?;",
    re.S,
)


def unwrap(framed_command: str) -> tuple[str, str]:
    """(the command as the login environment runs it, the frame's nonce)."""
    match = FRAMED.match(framed_command)
    assert match, f"not a framed command: {framed_command[:200]!r}"
    return match.group("command"), match.group("nonce")


def inner(command: str) -> str:
    """The command itself, without the login environment's lines before it."""
    return command.rsplit("\n", 1)[-1]


def answer(nonce: str, stdout: bytes = b"", stderr: bytes = b"", returncode: int = 0, *,
           before: bytes = b"", after: bytes = b"", err_before: bytes = b"") -> SimpleNamespace:  # fmt: skip
    """What the connection returns: ``stdout``/``stderr`` framed, noise around them."""
    begin, end = f"@@xffl-frame:{nonce}:begin".encode(), f"@@xffl-frame:{nonce}:end".encode()
    out = before + b"\n" + begin + b"\n" + stdout + b"\n" + end + b" %d\n" % returncode + after
    err = err_before + b"\n" + begin + b"\n" + stderr + b"\n" + end + b"\n"
    return SimpleNamespace(returncode=returncode, stdout=out, stderr=err)
