"""A facility's SSH target: its Airflow connection (and its jump hosts') read and checked."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import asyncssh

DEFAULT_PORT = 22
MAX_JUMP_HOSTS = 4
# Overrides of ``connect`` that also apply to the hops' connections: the tunnelled channel's
# flow control lives there.
_HOP_OVERRIDES = ("window", "max_pktsize")


class FacilityConnectionError(RuntimeError):
    """A facility's connection is missing, malformed, or its host cannot be reached.

    ``retryable`` is True when trying again later may succeed (host unreachable, connection
    dropped, certificate expired), False when it cannot (no such connection, host-key
    mismatch, login refused).
    """

    def __init__(self, conn_id: str, message: str, *, retryable: bool = False):
        super().__init__(f"connection {conn_id!r}: {message}")
        self.conn_id = conn_id
        self.retryable = retryable


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to open an SSH connection to one facility (no Airflow objects).

    ``jump_conn_ids`` are the hops the connection names; ``jumps`` the hops' own targets,
    outermost first, once looked up (``get_target`` / ``aget_target`` do that).
    """

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
    certificate: str | None = field(default=None, repr=False)
    certificate_file: str | None = None
    jump_conn_ids: tuple[str, ...] = ()
    jumps: tuple[SSHTarget, ...] = ()

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


def parse_jump_hosts(conn_id: str, value: Any) -> tuple[str, ...]:
    """The hops named by a ``jump_host`` extra: one connection id, "a,b", or a list, outermost first."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        hops = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        hops = [v.strip() for v in value]
    else:
        raise FacilityConnectionError(conn_id, "jump_host must be a connection id or a list of them")
    if any(not hop for hop in hops):
        raise FacilityConnectionError(conn_id, f"jump_host names an empty connection id: {value!r}")
    if conn_id in hops:
        raise FacilityConnectionError(conn_id, f"jump_host {hops} loops back to the connection itself")
    repeated = sorted({hop for hop in hops if hops.count(hop) > 1})
    if repeated:
        raise FacilityConnectionError(conn_id, f"jump_host {hops} goes through {repeated} twice (a loop)")
    if len(hops) > MAX_JUMP_HOSTS:
        raise FacilityConnectionError(
            conn_id, f"jump_host names {len(hops)} hops; at most {MAX_JUMP_HOSTS} are followed"
        )
    return tuple(hops)


def target_from_connection(conn: Any) -> SSHTarget:
    """Builds an ``SSHTarget`` from an Airflow connection (host, port, login, password, extras).

    The hops of ``jump_host`` are named (``jump_conn_ids``) but not looked up here.
    """
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
    certificate = extra.get("certificate") or None
    certificate_file = extra.get("certificate_file") or None
    if certificate and certificate_file:
        raise FacilityConnectionError(conn_id, "has both certificate and certificate_file extras; keep one")
    if (certificate or certificate_file) and not (extra.get("private_key") or extra.get("key_file")):
        raise FacilityConnectionError(
            conn_id, "has a certificate but no private_key or key_file extra: a certificate signs a key"
        )
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
        certificate=str(certificate) if certificate else None,
        certificate_file=os.path.expanduser(str(certificate_file)) if certificate_file else None,
        jump_conn_ids=parse_jump_hosts(conn_id, extra.get("jump_host")),
    )


def check_hop(conn_id: str, hop: SSHTarget) -> SSHTarget:
    """Refuses a hop that names hops of its own, or whose host key is not pinned for its host."""
    if hop.jump_conn_ids:
        raise FacilityConnectionError(
            conn_id,
            f"jump host {hop.conn_id!r} has a jump_host of its own ({list(hop.jump_conn_ids)}); "
            "list the whole route, outermost first, in this connection's jump_host",
        )
    trusted = asyncssh.import_known_hosts(hop.known_hosts).match(hop.host, "", hop.port)
    if not (trusted[0] or trusted[1]):  # neither a host key nor a host CA for host:port
        raise FacilityConnectionError(
            conn_id,
            f"jump host {hop.conn_id!r} has no pinned host key for {hop.host}:{hop.port}; "
            "set its host_key extra ('TYPE BASE64')",
        )
    return hop


def _hop_target(conn_id: str, hop_id: str, conn: Any) -> SSHTarget:
    try:
        return check_hop(conn_id, target_from_connection(conn))
    except FacilityConnectionError as error:
        if error.conn_id == conn_id:
            raise
        raise FacilityConnectionError(conn_id, f"jump host {error}", retryable=error.retryable) from None


def _not_found(conn_id: str, error: Exception, hop_of: str | None = None) -> FacilityConnectionError:
    if hop_of is None:
        return FacilityConnectionError(conn_id, f"not found in Airflow ({error})")
    return FacilityConnectionError(hop_of, f"jump host {conn_id!r} not found in Airflow ({error})")


def get_target(conn_id: str) -> SSHTarget:
    """Looks up ``conn_id`` and its jump hosts in Airflow (sync: operators and tasks)."""
    from airflow.sdk import BaseHook

    def lookup(cid: str, hop_of: str | None = None) -> Any:
        try:
            return BaseHook.get_connection(cid)
        except Exception as error:  # the SDK raises its own not-found error types
            raise _not_found(cid, error, hop_of) from None

    target = target_from_connection(lookup(conn_id))
    hops = tuple(_hop_target(conn_id, h, lookup(h, conn_id)) for h in target.jump_conn_ids)
    return replace(target, jumps=hops)


async def aget_target(conn_id: str) -> SSHTarget:
    """Looks up ``conn_id`` and its jump hosts in Airflow from async code (triggers)."""
    from airflow.sdk import BaseHook

    async def lookup(cid: str, hop_of: str | None = None) -> Any:
        try:
            return await BaseHook.aget_connection(cid)
        except Exception as error:
            raise _not_found(cid, error, hop_of) from None

    target = target_from_connection(await lookup(conn_id))
    hops = tuple([_hop_target(conn_id, h, await lookup(h, conn_id)) for h in target.jump_conn_ids])
    return replace(target, jumps=hops)
