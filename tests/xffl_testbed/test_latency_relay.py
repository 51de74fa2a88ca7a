"""The latency relay of the transfer benchmark (``xffl_testbed.latency_relay``).

Starts: an echo server (a thread) and relays on loopback ports, all closed by each test; one
test starts the relay as a child process and stops it by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time

import pytest

from xffl_testbed.latency_relay import LatencyRelay, RelayProcess


@contextlib.contextmanager
def echo_server():
    """A loopback server that sends back everything it reads, one thread per connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def round_trip(port: int, message: bytes = b"ping") -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"warm")  # the relay has connected upstream once this comes back
        assert conn.recv(64) == b"warm"
        start = time.perf_counter()
        conn.sendall(message)
        assert conn.recv(64) == message
        return time.perf_counter() - start


def echo_through(port: int, payload: bytes, piece: int) -> bytes:
    """Sends ``payload`` in pieces from one thread, reads the echo in another."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:

        def reader() -> None:
            while len(received) < len(payload) and (data := conn.recv(1 << 20)):
                received.extend(data)

        thread = threading.Thread(target=reader)
        thread.start()
        for offset in range(0, len(payload), piece):
            conn.sendall(payload[offset : offset + piece])
        thread.join(30)
        conn.shutdown(socket.SHUT_WR)
    return bytes(received)


def test_each_direction_gains_the_delay():
    with echo_server() as port:
        direct = min(round_trip(port) for _ in range(3))
        with LatencyRelay("127.0.0.1", port, delay=0.05) as relay:
            relayed = min(round_trip(relay.port) for _ in range(3))
    assert direct < 0.02
    assert 0.1 <= relayed < 0.1 + direct + 0.05  # 50 ms each way, and little else


def test_zero_delay_adds_next_to_nothing():
    with echo_server() as port, LatencyRelay("127.0.0.1", port, delay=0.0) as relay:
        assert min(round_trip(relay.port) for _ in range(3)) < 0.02


@pytest.mark.parametrize("piece", [1, 1000, 300_000])
def test_bytes_arrive_intact_and_in_order(piece):
    size = 50_000 if piece == 1 else 8 << 20
    payload = os.urandom(size)
    with echo_server() as port, LatencyRelay("127.0.0.1", port, delay=0.005) as relay:
        echoed = echo_through(relay.port, payload, piece)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert relay.bytes_relayed == 2 * size


def test_a_small_buffer_holds_back_the_sender_without_losing_bytes():
    payload = os.urandom(4 << 20)
    with echo_server() as port:
        with LatencyRelay("127.0.0.1", port, delay=0.01, buffer_bytes=256 * 1024) as relay:
            assert echo_through(relay.port, payload, 65536) == payload


def test_a_rate_cap_limits_the_throughput():
    payload = os.urandom(2_000_000)
    with echo_server() as port, LatencyRelay("127.0.0.1", port, delay=0.0, rate_mbps=10) as relay:
        start = time.perf_counter()
        assert echo_through(relay.port, payload, 100_000) == payload
        elapsed = time.perf_counter() - start
    assert elapsed >= 0.19  # 2 MB at 10 MB/s each way (the two directions overlap)


def test_the_relay_stops_by_itself_after_max_seconds():
    with echo_server() as port:
        relay = LatencyRelay("127.0.0.1", port, delay=0.0, max_seconds=0.3).start()
        try:
            assert relay.stopping.wait(3)
            with pytest.raises(OSError):
                round_trip(relay.port)
        finally:
            relay.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="delay"):
        LatencyRelay("127.0.0.1", 1, delay=-1)
    with pytest.raises(ValueError, match="rate_mbps"):
        LatencyRelay("127.0.0.1", 1, delay=0, rate_mbps=0)


def test_the_relay_process_delays_relays_and_is_stopped_by_pid():
    with echo_server() as port:
        relay = RelayProcess("127.0.0.1", port, delay=0.02, max_seconds=60)
        try:
            assert 0.04 <= round_trip(relay.port, b"through the child") < 0.2
        finally:
            relay.stop()
        assert relay.process.returncode == 0
        with pytest.raises(OSError):
            round_trip(relay.port)
