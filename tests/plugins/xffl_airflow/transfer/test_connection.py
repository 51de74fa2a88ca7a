"""The tuned connection options, the gathering transport and the dropped ignore packets (no SSH
server needed; test_transfer_live.py counts the packets of a real connection).

The transport is checked over a real socket pair: what the SSH layer writes during one turn of
the event loop reaches the socket as one ``send``, in order, and closing flushes it.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE
from asyncssh.encryption import BasicEncryption, ChachaEncryption, GCMEncryption
from xffl_airflow.ssh import FacilityConnectionError, SSHTarget, connect
from xffl_airflow.transfer import TransferOptions
from xffl_airflow.transfer.connection import (
    _GatheringConnector,
    _GatheringTransport,
    bulk_options,
    drop_ignores_under_aead,
)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGweSu7R6TPYPF70Lko35SziDPAo/sJvCT/bxDIOc9Ig"
TARGET = SSHTarget(
    conn_id="facility_x",
    host="hpc.example.org",
    port=2222,
    username="alice",
    known_hosts=f"[hpc.example.org]:2222 {HOST_KEY}\n",
    key_file="/keys/alice",
)


def test_bulk_options_add_the_tuning_and_never_touch_the_host_key():
    options = bulk_options(
        TARGET, TransferOptions(ciphers=("no-such-cipher", "aes128-gcm@openssh.com"))
    )
    assert "known_hosts" not in options and "client_keys" not in options
    assert options["encryption_algs"] == ["aes128-gcm@openssh.com"]
    assert options["compression_algs"] == ["none"]
    assert (options["window"], options["max_pktsize"]) == (16 << 20, 256 << 10)
    assert isinstance(options["tunnel"], _GatheringConnector)
    assert "tunnel" not in bulk_options(TARGET, TransferOptions(gather_writes=False))


def test_connect_refuses_to_override_the_pinned_host_key():
    with pytest.raises(ValueError, match="known_hosts cannot be overridden"):
        asyncio.run(connect(TARGET, known_hosts=None))


def test_no_usable_cipher_is_named():
    with pytest.raises(FacilityConnectionError, match="facility_x.*none of the ciphers"):
        bulk_options(TARGET, TransferOptions(ciphers=("rot13",)))


class RecordingTransport(asyncio.Transport):
    """Stands for the socket's transport: records each write call."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def test_writes_of_one_loop_turn_leave_as_one():
    async def scenario():
        inner = RecordingTransport()
        gathering = _GatheringTransport(inner, asyncio.get_running_loop())
        for packet in (b"ignore-1", b"data-1", b"ignore-2", b"data-2"):
            gathering.write(packet)
        assert inner.writes == []  # nothing yet: the turn is not over
        assert gathering.get_write_buffer_size() == 28
        await asyncio.sleep(0)
        gathering.write(b"next turn")
        gathering.close()  # flushes what is pending
        return inner

    inner = asyncio.run(scenario())
    assert inner.writes == [b"ignore-1data-1ignore-2data-2", b"next turn"]
    assert inner.closed


def test_the_connector_carries_bytes_both_ways_over_a_real_socket():
    async def scenario():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        received = asyncio.Queue()

        class Session(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                assert transport.get_extra_info("socket").family == socket.AF_INET

            def data_received(self, data):
                received.put_nowait(data)

        _, session = await _GatheringConnector().create_connection(Session, "127.0.0.1", port)
        session.transport.write(b"hello ")
        session.transport.write(b"facility")
        echoed = b""
        while len(echoed) < 14:
            echoed += await asyncio.wait_for(received.get(), 5)
        session.transport.close()
        server.close()
        await server.wait_closed()
        return echoed

    async def echo(reader, writer):
        writer.write(await reader.readexactly(14))
        await writer.drain()
        writer.close()

    assert asyncio.run(scenario()) == b"hello facility"


class SendingConnection:
    """What ``drop_ignores_under_aead`` needs of an asyncssh connection: ``send_packet``, the
    send cipher, and asyncssh's habit of inserting an ignore from inside ``send_packet``."""

    def __init__(self, encryption):
        self._send_encryption = encryption
        self.sent: list[tuple[int, tuple]] = []

    def send_packet(self, pkttype, *args, handler=None):
        if self._send_encryption is not None and pkttype > 49:  # asyncssh's own insertion
            self.send_packet(MSG_IGNORE, b"\0\0\0\0")
        self.sent.append((pkttype, args))


@pytest.mark.parametrize("aead", [GCMEncryption, ChachaEncryption])
def test_the_ignore_before_each_packet_is_dropped_under_an_aead_cipher(aead):
    conn = SendingConnection(object.__new__(aead))
    drop_ignores_under_aead(conn)
    conn.send_packet(MSG_CHANNEL_DATA, b"\0\0\0\1", b"\0\0\0\4data")
    conn.send_packet(MSG_IGNORE, b"\0\0\0\3pad")  # an ignore with content is not ours to drop
    assert conn.sent == [
        (MSG_CHANNEL_DATA, (b"\0\0\0\1", b"\0\0\0\4data")),
        (MSG_IGNORE, (b"\0\0\0\3pad",)),
    ]


@pytest.mark.parametrize("encryption", [None, "cbc-or-ctr"])
def test_ignores_stay_before_encryption_and_under_other_ciphers(encryption):
    conn = SendingConnection(None if encryption is None else object.__new__(BasicEncryption))
    drop_ignores_under_aead(conn)
    conn.send_packet(MSG_CHANNEL_DATA, b"\0\0\0\1")
    expected = [(MSG_CHANNEL_DATA, (b"\0\0\0\1",))]
    if encryption is not None:
        expected.insert(0, (MSG_IGNORE, (b"\0\0\0\0",)))
    assert conn.sent == expected


def test_a_connection_without_the_expected_attributes_is_left_alone():
    class Other:
        def send_packet(self, *args):
            return "sent"

    other = Other()
    drop_ignores_under_aead(other)
    assert "send_packet" not in vars(other) and other.send_packet(MSG_IGNORE, b"\0\0\0\0") == "sent"
