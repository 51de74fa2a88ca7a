"""The facilities' Airflow connections: looked up when the DAG is built and when a round starts.

When the DAG is built (the dag-processor parsing the DAG file), a connection that Airflow does
not have is a refusal: the DAG file's import error names the config file, the field and the
connection id, and no run can start until the connection is added (the next parse then builds
the DAG). Only existence is checked there: the host key and key file are read where the
transfers and jobs run, which may be another machine.

When a round starts (``prepare``), every connection must exist and be usable (host key pinned).
The task SDK reports a missing connection and an API that did not answer alike, so that failure
is retried, not refused.
"""

from __future__ import annotations

from collections.abc import Callable

from xffl_airflow.federation.config import ConfigError, FederationConfig


class ConnectionsUnavailable(RuntimeError):
    """A facility's Airflow connection could not be read (retried, not refused).

    The connection is missing, or Airflow's API did not answer: the task SDK reports both as
    "isn't defined", so the task retries, and adding the connection or the API coming back lets
    the round go on.
    """


def connection_problems(config: FederationConfig, lookup: Callable[[str], object]) -> list[str]:
    """One line per facility whose connection ``lookup`` cannot give, naming field and facility."""
    problems = []
    for index, facility in enumerate(config.facilities):
        try:
            lookup(facility.connection_id)
        except Exception as error:  # the SDK's own not-found types, FacilityConnectionError
            problems.append(f"facilities[{index}].conn_id ({facility.name}): {error}")
    return problems


def _defined(conn_id: str) -> object:
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # the SDK's not-found error, whatever the secrets backend said
        raise LookupError(
            f"connection {conn_id!r} is not defined in Airflow; add it (UI: Admin > Connections, "
            "AIRFLOW_CONN_* or a secrets backend) and the DAG is built at the next parse"
        ) from None


def refuse_missing_connections(config: FederationConfig, config_path: str) -> None:
    """At DAG build time: a connection Airflow does not have is a ``ConfigError`` naming the field."""
    problems = connection_problems(config, _defined)
    if problems:
        raise ConfigError(f"{config_path}: " + "\n".join(problems))


def check_connections(config: FederationConfig) -> None:
    """At round start: every facility's connection exists and is usable (host key pinned)."""
    from xffl_airflow.ssh import get_target

    problems = connection_problems(config, get_target)
    if problems:
        raise ConnectionsUnavailable("\n".join(problems))
