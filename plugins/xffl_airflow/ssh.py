"""Opening asyncssh connections to a facility from its Airflow SSH connection.

The Slurm hook, the trigger and the SFTP transfer all reach a facility through here, so there
is one place where host keys are checked: from the connection's ``host_key`` extra (pinned),
its ``known_hosts`` extra (a file), or the user's ``~/.ssh/known_hosts``. A connection that
asks to skip the check (``no_host_key_check``) is refused. Secrets stay in the Airflow
connection: the key comes from ``private_key`` or ``key_file``, or the password field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import asyncssh

DEFAULT_PORT = 22


class FacilityConnectionError(RuntimeError):
    """A facility's connection is missing, malformed, or its host cannot be reached.

    ``retryable`` is True when trying again later may succeed (host unreachable, connection
    dropped), False when it cannot (no such connection, host-key mismatch, login refused).
    """

    def __init__(self, conn_id: str, message: str, *, retryable: bool = False):
        super().__init__(f"connection {conn_id!r}: {message}")
        self.conn_id = conn_id
        self.retryable = retryable


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to open an SSH connection to one facility (no Airflow objects)."""

    conn_id: str
    host: str
    port: int
    username: str
    known_hosts: str = field(repr=False)
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    keepalive_interval: float = 30.0

    @property
    def address(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    """A known_hosts line pinning ``host_key`` ("TYPE BASE64") for ``host:port``."""
    parts = host_key.split()
    if len(parts) < 2:
        raise ValueError(f"host_key must read 'TYPE BASE64' (e.g. 'ssh-ed25519 AAAA...'), got {host_key!r}")
    pattern = host if port == DEFAULT_PORT else f"[{host}]:{port}"
    return f"{pattern} {parts[0]} {parts[1]}\n"


def target_from_connection(conn: Any) -> SSHTarget:
    """Builds an ``SSHTarget`` from an Airflow connection (host, port, login, password, extras)."""
    conn_id = getattr(conn, "conn_id", None) or "?"
    extra = dict(conn.extra_dejson or {})
    if not conn.host:
        raise FacilityConnectionError(conn_id, "has no host")
    if not conn.login:
        raise FacilityConnectionError(conn_id, "has no login (the facility user)")
    port = int(conn.port or DEFAULT_PORT)
    if _truthy(extra.get("no_host_key_check", False)) or _truthy(extra.get("ignore_hostkey_verification", False)):
        raise FacilityConnectionError(
            conn_id, "asks to skip host-key checking (no_host_key_check); pin the facility's host key instead"
        )
    if extra.get("host_key"):
        try:
            known_hosts = known_hosts_line(conn.host, port, str(extra["host_key"]))
        except ValueError as error:
            raise FacilityConnectionError(conn_id, str(error)) from None
    else:
        path = os.path.expanduser(str(extra.get("known_hosts") or "~/.ssh/known_hosts"))
        if not os.path.isfile(path):
            raise FacilityConnectionError(
                conn_id, f"has no host_key extra and no known_hosts file at {path}: the host key cannot be checked"
            )
        with open(path) as f:
            known_hosts = f.read()
    timeout = float(extra.get("conn_timeout") or 30)
    return SSHTarget(
        conn_id=conn_id,
        host=conn.host,
        port=port,
        username=conn.login,
        known_hosts=known_hosts,
        key_file=extra.get("key_file") or None,
        private_key=extra.get("private_key") or None,
        passphrase=extra.get("private_key_passphrase") or extra.get("passphrase") or None,
        password=conn.password or None,
        connect_timeout=timeout,
        keepalive_interval=float(extra.get("keepalive_interval") or 30),
    )


def get_target(conn_id: str) -> SSHTarget:
    """Looks up ``conn_id`` in Airflow (sync: operators and tasks)."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as error:  # the SDK raises its own not-found error types
        raise FacilityConnectionError(conn_id, f"not found in Airflow ({error})") from None
    return target_from_connection(conn)


async def aget_target(conn_id: str) -> SSHTarget:
    """Looks up ``conn_id`` in Airflow from async code (triggers)."""
    from airflow.sdk import BaseHook

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except Exception as error:
        raise FacilityConnectionError(conn_id, f"not found in Airflow ({error})") from None
    return target_from_connection(conn)


def connect_options(target: SSHTarget) -> dict[str, Any]:
    """The ``asyncssh.connect`` keyword arguments for ``target``."""
    options: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "username": target.username,
        "known_hosts": asyncssh.import_known_hosts(target.known_hosts),
        "connect_timeout": target.connect_timeout,
        "keepalive_interval": target.keepalive_interval,
        "keepalive_count_max": 3,
        # no ~/.ssh/config or agent surprises: only what the Airflow connection says
        "config": [],
        "agent_path": None,
    }
    if target.private_key:
        options["client_keys"] = [asyncssh.import_private_key(target.private_key, target.passphrase)]
    elif target.key_file:
        options["client_keys"] = [target.key_file]
        if target.passphrase:
            options["passphrase"] = target.passphrase
    else:
        options["client_keys"] = None
    if target.password:
        options["password"] = target.password
    return options


async def connect(target: SSHTarget, **overrides: Any) -> asyncssh.SSHClientConnection:
    """Opens an SSH connection with the host key checked; errors name the connection and host.

    ``overrides`` are further ``asyncssh.connect`` options (ciphers, window sizes, a tunnel);
    the host-key check cannot be overridden.
    """
    if "known_hosts" in overrides:
        raise ValueError("connect() keeps the connection's pinned host key; known_hosts cannot be overridden")
    try:
        return await asyncssh.connect(**{**connect_options(target), **overrides})
    except asyncssh.HostKeyNotVerifiable as error:
        raise FacilityConnectionError(
            target.conn_id, f"host key of {target.host}:{target.port} does not match the pinned key ({error})"
        ) from None
    except asyncssh.PermissionDenied as error:
        raise FacilityConnectionError(target.conn_id, f"{target.address} refused the login ({error})") from None
    except (OSError, TimeoutError, asyncssh.Error) as error:
        raise FacilityConnectionError(
            target.conn_id, f"cannot reach {target.address}: {type(error).__name__}: {error}", retryable=True
        ) from None
