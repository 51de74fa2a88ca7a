"""``${XFFL_NAME}`` in a federation config: replaced by that environment variable, in the file
only, and never shown back in an error (docs/security.md, R3)."""

from __future__ import annotations

import json
import re
from typing import Any

from xffl_airflow.federation.errors import ConfigError

# Environment variables a config file may refer to as ${NAME} (never Airflow's own, which
# hold connections and secrets).
ENV_PREFIX = "XFFL_"

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, environ: dict[str, str], *, where: str = "", used: dict[str, str] | None = None) -> Any:
    """Replaces ``${NAME}`` in every string with the environment variable NAME.

    Only names starting with ``XFFL_`` may be used (never ``AIRFLOW_CONN_...`` or any other
    variable of the worker); an undefined one is an error naming the field, never an empty
    string. ``used`` collects the values substituted, so errors can hide them.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, environ, where=f"{where}.{k}" if where else str(k), used=used) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, environ, where=f"{where}[{i}]", used=used) for i, v in enumerate(data)]
    if isinstance(data, str):
        def value(match: re.Match) -> str:
            name = match.group(1)
            if not name.startswith(ENV_PREFIX):
                raise ConfigError(
                    f"{where}: ${{{name}}} is not allowed; a config may refer only to environment "
                    f"variables named {ENV_PREFIX}* (docs/security.md, R3)"
                )
            if name not in environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            if used is not None:
                used[name] = environ[name]
            return environ[name]

        return ENV_REFERENCE.sub(value, data)
    return data


def hide_values(message: str, used: dict[str, str]) -> str:
    """``message`` with every substituted environment value replaced by its ``${NAME}``, and
    every run of 8 or more characters of one (a value cut or escaped by an error) too
    (``xffl_airflow.secrets_scrub``; docs/security.md, R3)."""
    from xffl_airflow.secrets_scrub import scrub

    for name, text in sorted(used.items(), key=lambda item: -len(item[1])):
        for shown in {text, repr(text)[1:-1], json.dumps(text)[1:-1]}:
            if shown:
                message = message.replace(shown, f"${{{name}}}")
    return scrub(message, used)
