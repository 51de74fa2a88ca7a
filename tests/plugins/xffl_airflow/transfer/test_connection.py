"""The tuned connection options and the gathering transport (no SSH server needed).

The transport is checked over a real socket pair: what the SSH layer writes during one turn of
the event loop reaches the socket as one ``send``, in order, and closing flushes it.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from xffl_airflow.ssh import FacilityConnectionError, SSHTarget, connect
from xffl_airflow.transfer import TransferOptions
from xffl_airflow.transfer.connection import _GatheringConnector, _GatheringTransport, bulk_options

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
