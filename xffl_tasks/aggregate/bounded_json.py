"""JSON from untrusted files, parsed only after a cheap check of how deep it nests.

``json.loads`` recurses once per level of nesting: a document of 200,000 ``[`` raises
RecursionError (or worse) instead of a message. ``nesting_depth`` measures the depth first,
without recursion and at C speed: strings are cut out, everything but brackets is dropped,
then the innermost pairs are removed one level at a time, at most ``limit`` times.
"""

from __future__ import annotations

import re

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def exceeds_depth(text: bytes, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` levels deep.

    Malformed text (unbalanced brackets, an unterminated string) is left to the parser, except
    that brackets it leaves unclosed may count as nesting.
    """
    structure = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        structure, removed = _INNERMOST.subn(b"", structure)
        if not removed:
            return False
    return _INNERMOST.search(structure) is not None
