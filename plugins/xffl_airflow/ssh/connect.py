"""Opening asyncssh connections to a facility: host key checked, through its jump hosts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncssh

from xffl_airflow.ssh.certificates import (
    CERT_CLOCK_SKEW,
    certificate_problem,
    certificate_source,
    load_certificate,
)
from xffl_airflow.ssh.target import (
    _HOP_OVERRIDES,
    FacilityConnectionError,
    SSHTarget,
)


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
            target.conn_id, f"the {certificate_source(target)} certifies another key than the connection's"
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
