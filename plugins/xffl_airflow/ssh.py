"""Opening asyncssh connections to a facility from its Airflow SSH connection.

The Slurm hook, the trigger and the SFTP transfer all reach a facility through here, so there
is one place where host keys are checked: from the connection's ``host_key`` extra (pinned),
its ``known_hosts`` extra (a file), or the user's ``~/.ssh/known_hosts``. A connection that
asks to skip the check (``no_host_key_check``) is refused. Secrets stay in the Airflow
connection: the key comes from ``private_key`` or ``key_file``, or the password field.

Access as centres grant it:

- ``certificate`` (the OpenSSH user certificate's text) or ``certificate_file`` (its path)
  pairs the key with a certificate signed by the site's CA. It is read again on every connect,
  so renewing the file (or the connection) mends an expired certificate without a restart. An
  expired or not-yet-valid certificate is a *retryable* error naming its validity: a campaign
  outlives a 12 h certificate, and a job is never read as failed because of it.
- ``jump_host`` names the Airflow SSH connection of a bastion (or a list of them, outermost
  first, at most ``MAX_JUMP_HOSTS``): each hop is a connection of its own, its host key pinned
  and checked like the facility's, and closing the facility's connection closes the hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncssh

DEFAULT_PORT = 22
MAX_JUMP_HOSTS = 4
# A login refused this close to the certificate's end (the site's clock runs ahead of ours) is
# read as the certificate having expired: retried, not refused.
CERT_CLOCK_SKEW = 300.0
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


# -- certificates ----------------------------------------------------------------------------


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # ssh-keygen's "forever" (2**64 - 1)
        return "forever" if seconds > 0 else "always"


def certificate_validity(cert: Any) -> tuple[int, int]:
    """(valid_after, valid_before) of an OpenSSH certificate, in seconds since the epoch.

    asyncssh decodes both but keeps them private (``SSHOpenSSHCertificate.validate`` reads them).
    """
    return int(cert._valid_after), int(cert._valid_before)


def _certificate_source(target: SSHTarget) -> str:
    return f"certificate_file {target.certificate_file}" if target.certificate_file else "certificate extra"


def load_certificate(target: SSHTarget) -> Any:
    """Reads the target's certificate now (never cached): the text, or the file as it is now."""
    source = _certificate_source(target)
    if target.certificate_file:
        try:
            with open(target.certificate_file, "rb") as f:
                data: bytes | str = f.read()
        except OSError as error:  # a renewal may be replacing it: asked again later
            raise FacilityConnectionError(
                target.conn_id, f"cannot read {source}: {error.strerror or type(error).__name__}", retryable=True
            ) from None
    else:
        data = str(target.certificate)
    try:
        cert = asyncssh.import_certificate(data)
    except (asyncssh.KeyImportError, ValueError) as error:
        raise FacilityConnectionError(target.conn_id, f"{source} is not an OpenSSH certificate ({error})") from None
    if not isinstance(cert, asyncssh.public_key.SSHOpenSSHCertificate):
        raise FacilityConnectionError(target.conn_id, f"{source} is an X.509 certificate; an OpenSSH one is needed")
    if cert._cert_type != asyncssh.public_key.CERT_TYPE_USER:
        raise FacilityConnectionError(target.conn_id, f"{source} is a host certificate; a user certificate is needed")
    return cert


def certificate_problem(target: SSHTarget, cert: Any, now: float | None = None, *, skew: float = 0.0) -> str | None:
    """Why ``cert`` cannot log in at ``now`` (expired, not yet valid), naming its validity; None if valid.

    ``skew``: seconds by which the site's clock may run ahead of ours.
    """
    now = time.time() if now is None else now
    after, before = certificate_validity(cert)
    window = f"valid from {_utc(after)} to {_utc(before)}"
    if now + skew >= before:
        return (
            f"the SSH certificate ({_certificate_source(target)}) expired at {_utc(before)} ({window}); "
            "renew it (the file or the connection) and the connection is tried again"
        )
    if now < after:
        return (
            f"the SSH certificate ({_certificate_source(target)}) is not valid before {_utc(after)} ({window}); "
            "check this machine's clock or the certificate"
        )
    return None


def _client_keys(target: SSHTarget) -> list[Any]:
    """[(key, certificate)] for a target with a certificate, checked to be valid now."""
    cert = load_certificate(target)
    problem = certificate_problem(target, cert)
    if problem:
        raise FacilityConnectionError(target.conn_id, problem, retryable=True)
    try:
        if target.private_key:
            key = asyncssh.import_private_key(target.private_key, target.passphrase)
        else:
            key = asyncssh.read_private_key(str(target.key_file), target.passphrase)
    except (OSError, asyncssh.KeyImportError, ValueError) as error:
        where = "private_key extra" if target.private_key else f"key_file {target.key_file}"
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise FacilityConnectionError(target.conn_id, f"cannot load the {where} ({reason})") from None
    if key.public_data != cert.key.public_data:
        raise FacilityConnectionError(
            target.conn_id, f"the {_certificate_source(target)} certifies another key than the connection's"
        )
    return [(key, cert)]


def connect_options(target: SSHTarget) -> dict[str, Any]:
    """The ``asyncssh.connect`` keyword arguments for ``target`` (its certificate read now)."""
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
    if target.certificate or target.certificate_file:
        options["client_keys"] = _client_keys(target)
    elif target.private_key:
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


# -- connecting ------------------------------------------------------------------------------


def _leg_name(leg: SSHTarget, facility: SSHTarget) -> str:
    """How errors name one leg of the route: the facility itself, or a jump host of it."""
    if leg is facility:
        via = f" via {' -> '.join(j.conn_id for j in facility.jumps)}" if facility.jumps else ""
        return f"{leg.address}{via}"
    return f"jump host {leg.conn_id!r} ({leg.address})"


def _refused_login(facility: SSHTarget, leg: SSHTarget, name: str, error: Exception) -> FacilityConnectionError:
    if leg.certificate or leg.certificate_file:
        with contextlib.suppress(FacilityConnectionError):
            problem = certificate_problem(leg, load_certificate(leg), skew=CERT_CLOCK_SKEW)
            if problem:  # refused at the certificate's end: the site's clock runs ahead
                return FacilityConnectionError(facility.conn_id, f"{name} refused the login: {problem}", retryable=True)
    return FacilityConnectionError(facility.conn_id, f"{name} refused the login ({error})")


async def _open_leg(facility: SSHTarget, leg: SSHTarget, overrides: dict[str, Any]) -> asyncssh.SSHClientConnection:
    """Connects one leg (a hop or the facility); errors name the facility, the leg and its limit."""
    name = _leg_name(leg, facility)
    try:
        options = connect_options(leg)
    except FacilityConnectionError as error:
        if leg is facility:
            raise
        raise FacilityConnectionError(
            facility.conn_id, f"jump host {error}", retryable=error.retryable
        ) from None
    try:
        return await asyncssh.connect(**{**options, **overrides})
    except asyncssh.HostKeyNotVerifiable as error:
        raise FacilityConnectionError(
            facility.conn_id,
            f"host key of {leg.host}:{leg.port}"
            + ("" if leg is facility else f" (jump host {leg.conn_id!r})")
            + f" does not match the pinned key ({error})",
        ) from None
    except asyncssh.PermissionDenied as error:
        raise _refused_login(facility, leg, name, error) from None
    except TimeoutError:
        raise FacilityConnectionError(
            facility.conn_id,
            f"connecting to {name} timed out after {leg.connect_timeout:g} s (conn_timeout of {leg.conn_id!r})",
            retryable=True,
        ) from None
    except asyncssh.ChannelOpenError as error:  # the hop would not open the tunnel
        prohibited = error.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        raise FacilityConnectionError(
            facility.conn_id,
            f"the last jump host would not open a tunnel to {leg.host}:{leg.port} for {name}: {error.reason}"
            + (" (forwarding not permitted there: AllowTcpForwarding / PermitOpen)" if prohibited else ""),
            retryable=not prohibited,
        ) from None
    except (OSError, asyncssh.Error) as error:
        raise FacilityConnectionError(
            facility.conn_id, f"cannot reach {name}: {type(error).__name__}: {error}", retryable=True
        ) from None


async def _discard(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()  # closes the hops before it too (their tunnel chain)
    with contextlib.suppress(TimeoutError, OSError, asyncssh.Error):
        async with asyncio.timeout(5):
            await conn.wait_closed()


async def connect(target: SSHTarget, **overrides: Any) -> asyncssh.SSHClientConnection:
    """Opens an SSH connection with the host key checked; errors name the connection and host.

    ``overrides`` are further ``asyncssh.connect`` options (ciphers, window sizes, a tunnel);
    the host-key check cannot be overridden. Through jump hosts, each hop is connected in turn
    (its own host key, key, certificate and timeout) and tunnels the next; a ``tunnel``
    override then carries the first hop's TCP connection, ``window`` and ``max_pktsize`` apply
    to every hop too, and closing the returned connection closes the hops.
    """
    if "known_hosts" in overrides:
        raise ValueError("connect() keeps the connection's pinned host key; known_hosts cannot be overridden")
    if target.jump_conn_ids and len(target.jumps) != len(target.jump_conn_ids):
        raise FacilityConnectionError(
            target.conn_id, "names jump hosts that were not looked up; use get_target()/aget_target()"
        )
    if not target.jumps:
        return await _open_leg(target, target, overrides)
    overrides = dict(overrides)
    tunnel = overrides.pop("tunnel", None)
    hop_overrides = {k: overrides[k] for k in _HOP_OVERRIDES if k in overrides}
    via: asyncssh.SSHClientConnection | None = None
    try:
        for leg in (*target.jumps, target):
            options = overrides if leg is target else dict(hop_overrides)
            carrier = via if via is not None else tunnel
            conn = await _open_leg(target, leg, {**options, **({"tunnel": carrier} if carrier else {})})
            if via is not None:
                conn.set_tunnel(via)  # asyncssh closes the tunnel when this connection closes
            via = conn
    except BaseException:
        if via is not None:
            await _discard(via)
        raise
    assert via is not None
    return via
