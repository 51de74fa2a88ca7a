"""Masking the values of ``${XFFL_*}`` environment variables in text that may be shown: errors,
log lines, XCom, manifests. Pure functions (``xffl_secrets`` only reads the mapping it is given).

A config value may refer to an environment variable named ``XFFL_*`` (``federation.config``),
and such a value may be a secret (a token, a key, a password in a URL). Replacing whole values
is not enough: an error that echoes a value cut to 40 characters, or escaped by ``repr`` or
JSON (a key's newlines shown as ``\\n``), shows the secret's start. The rule (docs/security.md,
R3): no text we show holds any run of ``MIN_RUN`` (8) or more characters that is a substring
of such a value, as the value is or as ``repr`` or JSON escape it. Every such run is replaced
by ``${NAME}``; runs of two values that touch or overlap become ``${A}${B}``.

Over-masking is accepted: a path that shares 8 characters with a value (``/opt/xffl/...`` and
``XFFL_STORAGE=/opt/xffl/campaigns``) reads ``${XFFL_STORAGE}...`` there. A value that is a
plain absolute path (``PATH_VALUE``: no whitespace, no ``://``) names where something is, not a
secret: only its runs that hold a ``/`` are masked, so that the words it is made of
(``/opt/venv-facility/bin/python``: "facility") stay readable in every other message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

PREFIX = "XFFL_"
# The shortest run of a value that is masked, and the shortest value ``xffl_secrets`` returns:
# a shorter value (a flag, a port) is no secret worth masking, and would mask common words.
MIN_RUN = 8
# xffl's own settings, read by xffl itself (the config file's path, the test bed's and the
# demo's switches, a component's name): not values a config refers to, and masking them would
# hide words such as "scheduler" or "postgresql" in every error.
OWN_SETTINGS = frozenset({
    "XFFL_FEDERATION_CONFIG", "XFFL_AIRFLOW_COMPONENT", "XFFL_RUN_DIR", "XFFL_TEST_TIER",
    "XFFL_EXTRA_SYSTEM_PACKAGES", "XFFL_TASKS_SOURCES", "XFFL_OUTAGE_SIGNALS",
})  # fmt: skip
OWN_PREFIXES = ("XFFL_DEMO_",)
PATH_VALUE = re.compile(r"/[^\s]*")


def _python_escaped(value: str, *, quote: str) -> str:
    """``value`` as ``repr`` shows it inside a string quoted by ``quote``."""
    out = []
    for char in value:
        shown = repr(char)[1:-1]
        if char == quote:
            shown = "\\" + char
        elif char in "'\"":
            shown = char
        out.append(shown)
    return "".join(out)


def shown_forms(value: str) -> set[str]:
    """The ways ``value`` appears in text we make: as is, escaped by ``repr`` (inside either
    quote), escaped by JSON (ASCII or not), and each of those escaped once more (a repr of an
    error message that held a repr)."""
    once = {
        value,
        _python_escaped(value, quote="'"),
        _python_escaped(value, quote='"'),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }
    twice = {_python_escaped(form, quote="'") for form in once}
    twice |= {json.dumps(form)[1:-1] for form in once}
    return {form for form in once | twice if form}


def _runs(secrets: Mapping[str, str], min_run: int) -> dict[str, str]:
    """Every ``min_run``-character run of every shown form of every value: the value's name
    (the first name in sorted order when two values share a run)."""
    runs: dict[str, str] = {}
    for name in sorted(secrets):
        value = secrets[name]
        if not isinstance(value, str) or len(value) < min_run:
            continue
        path = PATH_VALUE.fullmatch(value) is not None and "://" not in value
        for form in shown_forms(value):
            for start in range(len(form) - min_run + 1):
                run = form[start : start + min_run]
                if not path or "/" in run:
                    runs.setdefault(run, name)
    return runs


def scrub(text: str, secrets: Mapping[str, str], *, min_run: int = MIN_RUN) -> str:
    """``text`` with every run of ``min_run`` or more characters that is a substring of a value
    of ``secrets`` (name: value; see ``shown_forms``) replaced by ``${NAME}``.

    Values shorter than ``min_run`` are left alone (replace those whole where it matters).
    Exactly the characters that lie in some such run are masked; a maximal stretch of masked
    characters becomes the names of the values it came from, in order: ``${A}`` or ``${A}${B}``.
    """
    if min_run < 1:
        raise ValueError(f"min_run must be at least 1, got {min_run}")
    if not isinstance(text, str) or len(text) < min_run or not secrets:
        return text
    runs = _runs(secrets, min_run)
    if not runs:
        return text
    owner: list[str | None] = [None] * len(text)
    for start in range(len(text) - min_run + 1):
        name = runs.get(text[start : start + min_run])
        if name is not None:
            for i in range(start, start + min_run):
                if owner[i] is None:
                    owner[i] = name
    out: list[str] = []
    i = 0
    while i < len(text):
        if owner[i] is None:
            out.append(text[i])
            i += 1
            continue
        names: list[str] = []
        while i < len(text) and owner[i] is not None:
            if not names or names[-1] != owner[i]:
                names.append(owner[i])
            i += 1
        out.append("".join(f"${{{name}}}" for name in dict.fromkeys(names)))
    return "".join(out)


def xffl_secrets(
    environ: Mapping[str, str] | None = None,
    *,
    names: frozenset[str] | set[str] | None = None,
    min_length: int = MIN_RUN,
) -> dict[str, str]:
    """The ``XFFL_*`` variables of ``environ`` (``os.environ`` when None) that a config may have
    expanded and that are worth masking: at least ``min_length`` characters long, not one of
    xffl's own settings (``OWN_SETTINGS``, ``XFFL_DEMO_*``), and, when ``names`` is given (the
    names a config referred to), only those."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(PREFIX)
        and (names is not None or (name not in OWN_SETTINGS and not name.startswith(OWN_PREFIXES)))
        and isinstance(value, str)
        and len(value) >= min_length
        and (names is None or name in names)
    }


def scrub_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``scrub(text, xffl_secrets(environ))``: what an error path calls."""
    return scrub(text, xffl_secrets(environ))
