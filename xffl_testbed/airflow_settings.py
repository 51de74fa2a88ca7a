"""The Airflow settings shared by the compose deployment and the native test bed.

``docker/config/airflow.env`` is the one source: compose reads it as an ``env_file`` for every
Airflow service, and ``AirflowInstance`` applies its groups on top of its host-specific
settings (URLs, ports, paths, broker). The file is ``KEY=VALUE`` lines (no quotes, no
interpolation: what compose and this reader both take literally) in groups, each started by a
``# --- group: NAME ---`` comment. Which groups the test bed applies:

- ``common``: always;
- ``latency``: unless an instance is made with ``latency=False``;
- ``executor``, ``workers``, ``celery``: with the CeleryExecutor (the embedded default keeps
  the preloading LocalExecutor and Airflow's own heartbeat timeout).
"""

from __future__ import annotations

import re
from pathlib import Path

SETTINGS_FILE = Path(__file__).resolve().parent.parent / "docker" / "config" / "airflow.env"
# The groups the test bed reads (see above): a file without one of them does not load.
GROUPS = ("common", "executor", "latency", "workers", "celery")
GROUP = re.compile(r"#\s*---\s*group:\s*([a-z][a-z0-9_-]*)\s*---\s*")
KEY = re.compile(r"[A-Z_][A-Z0-9_]*")


class SettingsError(ValueError):
    """The settings file does not parse; the message names the file and the line."""


def parse_settings(text: str, *, source: str = "airflow.env") -> dict[str, dict[str, str]]:
    """Group name -> {KEY: value}, in file order. Refuses a setting outside any group, a line
    that is not KEY=VALUE, a quoted value and a key set twice, naming ``source`` and the line."""
    groups: dict[str, dict[str, str]] = {}
    seen: dict[str, int] = {}
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = f"{source}:{number}"
        if match := GROUP.fullmatch(line):
            name = match.group(1)
            if name in groups:
                raise SettingsError(f"{where}: group {name!r} appears twice")
            current = groups[name] = {}
            continue
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not KEY.fullmatch(key):
            raise SettingsError(f"{where}: not a KEY=VALUE line: {raw!r}")
        if value[:1] in ("'", '"'):
            raise SettingsError(f"{where}: {key}: write the value without quotes")
        if current is None:
            raise SettingsError(f"{where}: {key} is outside any `# --- group: NAME ---`")
        if key in seen:
            raise SettingsError(f"{where}: {key} is already set on line {seen[key]}")
        seen[key] = number
        current[key] = value.strip()
    return groups


def load_settings(path: str | Path = SETTINGS_FILE) -> dict[str, dict[str, str]]:
    """The groups of the settings file (``docker/config/airflow.env`` by default); raises
    naming the file when it is missing, does not parse or lacks one of ``GROUPS``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SettingsError(f"{path}: the shared Airflow settings file is missing") from None
    groups = parse_settings(text, source=str(path))
    missing = [name for name in GROUPS if name not in groups]
    if missing:
        raise SettingsError(
            f"{path}: no group {', '.join(missing)} (a `# --- group: NAME ---` line each)"
        )
    return groups
