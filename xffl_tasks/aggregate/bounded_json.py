"""JSON from untrusted files: one bounded reader for every JSON file a facility sends.

``load_json`` is the only way the aggregation (and the pull's checks) parse a facility's JSON:
``metrics.json``, ``model.safetensors.index.json``, ``adapter_config.json`` and every
safetensors header. Whatever it accepts, the other readers of these bytes accept too (the
Rust ``serde_json`` of the ``safetensors`` library, Python's ``json``); whatever goes wrong
while reading is a ``JSONError`` with one line saying what, never another exception:

- size: at most ``max_bytes`` bytes (the caller reads no more than one byte past it);
- nesting: at most ``max_depth`` levels of arrays and objects, measured before parsing,
  without recursion and at C speed (``nesting_problem``): ``json.loads`` recurses once per
  level, so ``[[[[...`` (closed or not) would raise RecursionError;
- encoding: strict UTF-8 (no BOM, no encoded surrogates, no overlong forms);
- strings: no lone surrogate escape (``"\\ud800"``): Python accepts it, serde_json refuses it;
- integers: at most ``max_int_digits`` digits (Python refuses more than 4300 with a
  ValueError, and converting them costs quadratic time); ``-0`` is the float -0.0, as in
  serde_json;
- keys: no key twice in an object (parsers disagree on which one wins).

``NaN``, ``Infinity`` and numbers beyond the float range parse (as Python does) so that a
schema can name the field; the schemas refuse them.
"""

from __future__ import annotations

import json
import re

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Brackets only, every opening one as ``[`` and every closing one as ``]`` (a mismatched pair
#: is the parser's to refuse; it nests no deeper than a matched one).
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: More digits than any count, offset or size of ours needs (2**64 has 20).
MAX_INT_DIGITS = 20


class JSONError(ValueError):
    """Bytes that are not JSON within the limits; the message says what, the caller where."""


def nesting_problem(text: bytes, limit: int) -> str | None:
    """Why ``text`` cannot be parsed within ``limit`` levels of nesting, or None.

    Strings are cut out, everything but brackets dropped, then innermost pairs removed one
    level at a time, at most ``limit`` times. Valid JSON of at most ``limit`` levels leaves
    nothing; a pair left means deeper nesting; a lone bracket left means brackets that do not
    balance (unclosed ones count: the parser would descend into them before failing).
    """
    structure = _STRING.sub(b"", text).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    for _ in range(limit):
        if not structure:
            return None
        shorter = structure.replace(b"[]", b"")  # every innermost pair at once, left to right
        if len(shorter) == len(structure):
            break
        structure = shorter
    if not structure:
        return None
    if b"[]" in structure:
        return f"nests deeper than {limit} levels"
    return "is not valid JSON (its brackets do not balance)"


def exceeds_depth(text: bytes, limit: int) -> bool:
    """Whether ``text`` nests (or leaves unclosed) more than ``limit`` levels of brackets."""
    return nesting_problem(text, limit) is not None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise JSONError(f"key {_short(key)} appears twice in one object")
        found[key] = value
    return found


def _short(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else f"{shown[:57]}..."


def _integer(limit: int):
    def parse(digits: str) -> int | float:
        if len(digits.lstrip("-")) > limit:
            count = len(digits.lstrip("-"))
            raise JSONError(f"is not valid JSON (an integer of {count} digits, more than {limit})")
        if digits == "-0":
            return -0.0
        return int(digits)

    return parse


def _lone_surrogate(value: object) -> str | None:
    """The first string (key or value) of ``value`` holding a lone surrogate, or None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            strings = (item,)
        elif isinstance(item, dict):
            strings = tuple(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
            continue
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return text
    return None


def load_json(
    data: bytes, *, max_bytes: int, max_depth: int, max_int_digits: int = MAX_INT_DIGITS
) -> object:
    """The JSON value in ``data``, within the limits above; raises JSONError saying why not."""
    if len(data) > max_bytes:
        raise JSONError(f"is larger than {max_bytes} bytes")
    problem = nesting_problem(data, max_depth)
    if problem:
        raise JSONError(problem)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JSONError(f"is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_int=_integer(max_int_digits)
        )
    except JSONError:
        raise
    except json.JSONDecodeError as error:
        raise JSONError(f"is not valid JSON ({error.msg} at character {error.pos})") from None
    except (ValueError, RecursionError, OverflowError, TypeError) as error:  # the limits hold
        raise JSONError(f"is not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None
    found = _lone_surrogate(value)
    if found is not None:
        raise JSONError(
            f"has a lone surrogate escape in the string {_short(found)} (not Unicode text)"
        )
    return value
