"""The SSH connection of one transfer attempt, tuned for bulk data.

Host key, user and credentials come from ``xffl_airflow.ssh.connect_options`` (the facility's
Airflow connection, host key pinned). On top of them this module sets what bulk transfer needs:
ciphers that are cheap in asyncssh (aes128-gcm first), no compression (model weights do not
compress), a large receive window and packet size, and a transport that hands the socket
everything the SSH layer wrote during one turn of the event loop in a single ``send``.

asyncssh writes every SSH packet (at most 32 KiB towards OpenSSH, plus an SSH_MSG_IGNORE before
each) with its own ``socket.send``; gathering them per loop turn cut the client's CPU per GB by
5 to 12 % in our measurements (see docs/transfer.md). The transport is plugged in through
asyncssh's ``tunnel`` argument, which takes any object with a ``create_connection(session_factory,
host, port)`` coroutine (asyncssh types it as a protocol, ``_TunnelConnectorProtocol``); the
``gather_writes=False`` option connects the plain way.

asyncssh also puts an empty SSH_MSG_IGNORE before every packet it encrypts: the countermeasure
against chosen-plaintext attacks on CBC modes (RFC 4251, section 9.3.1). With the AEAD ciphers
a transfer negotiates (AES-GCM, chacha20-poly1305) there is nothing to counter, and OpenSSH sends
none; the gathering connector drops them there, which halves the packets the client encrypts
and cut its CPU per GB pushed by about 9 % (docs/transfer.md). With any other cipher they stay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncssh
from asyncssh.constants import MSG_IGNORE
from asyncssh.encryption import ChachaEncryption, GCMEncryption

from xffl_airflow.ssh import FacilityConnectionError, SSHTarget, connect
from xffl_airflow.transfer.options import TransferOptions

# asyncssh logs every channel at INFO, and a transfer opens a dozen (SFTP channels, hashing
# commands): quieten it in the task log, unless the deployment set its level itself (as the
# Slurm hook does).
if logging.getLogger("asyncssh").level == logging.NOTSET:
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _GatheringTransport(asyncio.Transport):
    """A TCP transport that sends the writes of one event-loop turn as one buffer."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))


class _Relay(asyncio.Protocol):
    """Passes the socket's events to asyncssh's connection, which writes through the gatherer."""

    def __init__(self, inner: Any):
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(_GatheringTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


_AEAD_ENCRYPTIONS = (GCMEncryption, ChachaEncryption)
_EMPTY_STRING = b"\0\0\0\0"  # String(b"") on the wire: the inserted ignore's only field


def drop_ignores_under_aead(conn: Any) -> None:
    """Makes ``conn`` (an asyncssh connection) skip the empty SSH_MSG_IGNORE it inserts before
    each packet, while its send cipher is AEAD. Anything else it sends goes out as before."""
    send = getattr(conn, "send_packet", None)
    if send is None or not hasattr(conn, "_send_encryption"):
        return  # not the asyncssh this was written against: change nothing

    def send_packet(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_STRING,)
            and isinstance(conn._send_encryption, _AEAD_ENCRYPTIONS)
        ):
            return
        send(pkttype, *args, **kwargs)

    conn.send_packet = send_packet


class _GatheringConnector:
    """asyncssh ``tunnel``: opens the TCP connection itself and inserts the gathering transport."""

    async def create_connection(self, session_factory, host: str, port: int):
        loop = asyncio.get_running_loop()

        def relay() -> _Relay:
            conn = session_factory()
            drop_ignores_under_aead(conn)
            return _Relay(conn)

        transport, relay_protocol = await loop.create_connection(relay, host, port)
        return transport, relay_protocol.inner


def bulk_options(target: SSHTarget, options: TransferOptions) -> dict[str, Any]:
    """The bulk-transfer tuning added to the facility's ``asyncssh.connect`` options."""
    supported = {alg.decode() for alg in asyncssh.encryption.get_encryption_algs()}
    ciphers = [c for c in options.ciphers if c in supported]
    if not ciphers:
        raise FacilityConnectionError(
            target.conn_id, f"none of the ciphers {list(options.ciphers)} is available in asyncssh"
        )
    tuned: dict[str, Any] = {
        "encryption_algs": ciphers,
        "compression_algs": ["none"],
        "window": options.window,
        "max_pktsize": options.max_packet,
    }
    if options.gather_writes:
        tuned["tunnel"] = _GatheringConnector()
    return tuned


async def open_connection(
    target: SSHTarget, options: TransferOptions
) -> asyncssh.SSHClientConnection:
    """Opens the attempt's SSH connection (host key pinned, errors as ``ssh.connect``'s)."""
    return await connect(target, **bulk_options(target, options))
