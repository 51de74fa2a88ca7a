"""A TCP relay on loopback that adds a fixed one-way delay each way: WAN latency in user space.

Kernel traffic shaping (``tc netem``) is not available on the development machines, so the
transfer benchmark puts this relay between the client and a local facility's sshd:

    python -m xffl_testbed.latency_relay --target 127.0.0.1:2223 --delay-ms 15 --max-seconds 3600

prints ``listening on 127.0.0.1:PORT`` once ready. Every chunk read from one side is stamped with
the time it arrived and written to the other side ``delay`` seconds later, in order, so a round
trip through the relay gains ``2 * delay``. What waits in the relay per direction is bounded
only by ``buffer_bytes`` (512 MiB by default: the relay is not meant to be the window), and there
is no bandwidth cap unless ``rate_mbps`` is given (then a chunk also waits for the ones before it
to be "serialised" at that rate, as on a link of that speed).

The relay answers the TCP handshake and acknowledges bytes at once, so TCP's own window never
sees the delay: it emulates a link whose TCP buffers are large enough (see docs/transfer.md), and
shows what the application's own windows (SSH channel windows, SFTP requests in flight) do.

Each direction of each connection has a reader thread (blocking ``recv_into`` of up to 1 MiB
into a pooled buffer, then a timestamp) and a writer thread (sleeps until the chunk's time,
then ``sendall``): the threads spend their time in system calls, which release the GIL. Buffers
are reused because fresh 1 MiB buffers (and asyncio's fresh 256 KiB ``bytes`` per read) cost a
page fault per 4 KiB: that tripled the relay's CPU per GB. After a small read (SSH traffic comes
in packets of 32 KiB and less) the reader waits ``gather`` (at most 0.5 ms) so that the next
read takes several at once. On the 2-core development machine the relay moved 1.1 to 1.5 GB/s
of plain TCP at 0 ms (direct loopback: 1.9 to 2.4 GB/s) for about 0.6 s of CPU per GB relayed,
and 1.0 to 1.7 s per GB of SSH traffic (the benchmark reports it as ``relay_cpu_s_per_gb``).

``RelayProcess`` runs it as a child process (so it does not share a GIL with what is measured)
and stops it by its PID; ``LatencyRelay`` is the relay itself. Either ends after
``max_seconds`` in any case.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

MIB = 1 << 20
READ_SIZE = MIB  # largest chunk read at once
SMALL = 64 * 1024  # a chunk below this is copied out of its read buffer


class _Direction:
    """One direction of one relayed connection: a reader, a queue of stamped chunks, a writer."""

    def __init__(self, relay: LatencyRelay, source: socket.socket, dest: socket.socket):
        self.relay = relay
        self.source = source
        self.dest = dest
        # (deadline, data, its pooled buffer or None)
        self.queue: collections.deque[tuple[float, bytes | memoryview, bytearray | None]] = (
            collections.deque()
        )
        self.free: list[bytearray] = []  # read buffers to reuse: fresh ones cost page faults
        self.queued = 0
        self.cond = threading.Condition()
        self.link_free = 0.0  # with a rate cap: when the "link" has sent what is queued
        self.finished = threading.Event()

    def read_loop(self) -> None:
        relay = self.relay
        try:
            while True:
                with self.cond:
                    while self.queued > relay.buffer_bytes and not relay.stopping.is_set():
                        self.cond.wait(0.5)
                    buffer = self.free.pop() if self.free else bytearray(READ_SIZE)
                if relay.stopping.is_set():
                    return
                try:
                    size = self.source.recv_into(buffer)
                except OSError:
                    size = 0
                now = time.monotonic()
                if size and relay.rate is not None:
                    self.link_free = max(self.link_free, now) + size / relay.rate
                    now = self.link_free
                if size < SMALL:  # a small chunk is copied out; its buffer is reused at once
                    data: bytes | memoryview = bytes(buffer[:size])
                    keep = None
                else:
                    data, keep = memoryview(buffer)[:size], buffer
                with self.cond:
                    if keep is None:
                        self.free.append(buffer)
                    self.queue.append((now + relay.delay, data, keep))
                    self.queued += size
                    relay.bytes_relayed += size
                    self.cond.notify_all()
                if not size:
                    return
                if size < SMALL and relay.gather:
                    time.sleep(relay.gather)  # let a few packets gather: fewer, larger chunks
        finally:
            with self.cond:
                self.cond.notify_all()

    def write_loop(self) -> None:
        relay = self.relay
        try:
            while not relay.stopping.is_set():
                with self.cond:
                    while not self.queue and not relay.stopping.is_set():
                        self.cond.wait(0.5)
                    if relay.stopping.is_set():
                        return
                    deadline = self.queue[0][0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                now = time.monotonic()
                chunks: list[tuple[bytes | memoryview, bytearray | None]] = []
                eof = False
                with self.cond:  # everything that is due
                    while self.queue and self.queue[0][0] <= now:
                        _, data, keep = self.queue.popleft()
                        if not len(data):
                            eof = True
                            break
                        chunks.append((data, keep))
                for data, keep in chunks:
                    try:
                        self.dest.sendall(data)
                    except OSError:
                        return
                    with self.cond:
                        self.queued -= len(data)
                        if keep is not None:
                            data.release()  # type: ignore[union-attr]
                            self.free.append(keep)
                        self.cond.notify_all()
                if eof:
                    with contextlib.suppress(OSError):
                        self.dest.shutdown(socket.SHUT_WR)
                    return
        finally:
            self.finished.set()


class LatencyRelay:
    """Listens on ``listen_host:listen_port`` (0: any free port) and relays each connection to
    ``target_host:target_port`` with ``delay`` seconds added each way.

    :param delay: one-way delay in seconds (the round trip gains twice this)
    :param rate_mbps: optional bandwidth cap per direction and connection, MB/s (10**6 bytes)
    :param buffer_bytes: bytes that may wait in the relay per direction before it stops reading
    :param max_seconds: the relay stops by itself after this long
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay: float,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rate_mbps: float | None = None,
        buffer_bytes: int = 512 * MIB,
        max_seconds: float = 3600.0,
    ):
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        if rate_mbps is not None and rate_mbps <= 0:
            raise ValueError(f"rate_mbps must be positive, got {rate_mbps}")
        self.target = (target_host, target_port)
        self.delay = delay
        self.rate = rate_mbps * 1e6 if rate_mbps is not None else None
        self.buffer_bytes = buffer_bytes
        self.max_seconds = max_seconds
        # after a small read, wait this long before the next one (a 20th of the delay, at most
        # 0.5 ms; none without delay): at most that much more delay, for half the relay's CPU
        self.gather = min(0.0005, delay / 20)
        self.bytes_relayed = 0
        self.stopping = threading.Event()
        self._listener = socket.create_server((listen_host, listen_port), backlog=128)
        self._listener.settimeout(0.5)
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._started = 0.0

    @property
    def host(self) -> str:
        return self._listener.getsockname()[0]

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def start(self) -> LatencyRelay:
        self._started = time.monotonic()
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            if time.monotonic() - self._started > self.max_seconds:
                self.stopping.set()
                break
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self._spawn(self._relay_connection, client)
        self._close_all()

    def _relay_connection(self, client: socket.socket) -> None:
        client.settimeout(None)
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets |= {client, upstream}
        directions = [_Direction(self, client, upstream), _Direction(self, upstream, client)]
        for direction in directions:
            self._spawn(direction.read_loop)
            self._spawn(direction.write_loop)
        for direction in directions:
            direction.finished.wait()
        with self._lock:
            self._sockets -= {client, upstream}
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader still blocked in recv
            sock.close()

    def _close_all(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stops accepting, cuts every relayed connection and waits for the threads."""
        self.stopping.set()
        self._close_all()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> LatencyRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RelayProcess:
    """``python -m xffl_testbed.latency_relay`` as a child process; ``stop()`` ends it by PID.

    :param max_seconds: the child ends by itself after this long, even if nobody stops it
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay: float,
        rate_mbps: float | None = None,
        max_seconds: float = 3600.0,
    ):
        argv = [
            sys.executable, "-m", "xffl_testbed.latency_relay",
            "--target", f"{target_host}:{target_port}", "--delay-ms", repr(delay * 1000),
            "--max-seconds", repr(max_seconds),
        ]  # fmt: skip
        if rate_mbps is not None:
            argv += ["--rate-mbps", repr(rate_mbps)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.match(r"listening on (\S+):(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"latency relay did not start: {line!r}")
        self.host, self.port = found.group(1), int(found.group(2))

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay each way")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--rate-mbps", type=float, default=None, help="bandwidth cap, MB/s")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="the relay ends after this long"
    )
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    relay = LatencyRelay(
        host, int(port), delay=args.delay_ms / 1000, listen_host=args.listen_host,
        listen_port=args.listen_port, rate_mbps=args.rate_mbps, max_seconds=args.max_seconds,
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with relay:
        print(f"listening on {relay.host}:{relay.port}", flush=True)
        while not stop.is_set() and not relay.stopping.is_set():
            stop.wait(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
