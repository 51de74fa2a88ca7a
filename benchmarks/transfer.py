"""Model transfer throughput: ours against OpenSSH's sftp and Airflow's SFTPHook, in one run.

    python benchmarks/transfer.py --size-mb 1024 --json

Starts its own local facility (sshd on a loopback port, host key pinned: needs root, as
`make test` does), writes one file of random bytes, and on that same file times, end to end
(connection set-up included):

- ours: ``xffl_airflow.transfer.push`` and ``pull`` with default tuning, sha256 verification on
  both sides and the atomic rename included;
- OpenSSH: ``sftp -b - -B 261120 -R 64`` put and get (its default cipher);
- Airflow: ``SFTPHook.store_file`` and ``retrieve_file`` with defaults, once per direction
  (it is an order of magnitude slower).

- OpenSSH verified: the same ``sftp`` put or get, with ``sha256sum`` of the file at both ends
  (the source's hash runs while the file moves, the destination's after it; the two digests
  must match): the fair baseline for a verified transfer (``openssh_verified_put_mbps``/
  ``..._get_mbps``).

With ``--rtt-ms N`` every contender goes through a latency relay (``xffl_testbed.latency_relay``,
a child process on a loopback port, N/2 ms added each way, no bandwidth cap unless
``--rate-mbps``), and the result holds the RTT measured through it (``rtt_measured_ms``: the
median of SFTP ``stat`` round trips over an SSH connection through the relay), the relay's raw
TCP throughput next to direct loopback's (``relay_raw_mbps``, ``direct_raw_mbps``) and the CPU
it used per GB relayed during the timed runs (``relay_cpu_s_per_gb``). ``--rtt-ms 0`` puts the
relay in without delay: compare with a run without the option to see what the relay costs.

With ``--unverified-too`` it also times ours with sha256 replaced by a no-op on both sides
(``ours_unverified_put_mbps``/``..._get_mbps``): the transport alone, to tell its cost from the
verification's. That is a measurement only, never a mode of the product.

Ours and OpenSSH alternate ``--repeat`` times (who goes first alternates too) and the medians
are reported; every single figure is in ``runs``. One JSON line on stdout. MB/s are 10**6
bytes per second. The destination is removed before each run, so nothing is skipped.
``cpu_s_per_gb`` gives, per contender, the median CPU seconds per GB moved here (``client``: this
process with its threads and child processes) and on the facility (its sshd's session processes).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

if "AIRFLOW_HOME" not in os.environ:  # a throw-away home: the connection comes from the env
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="xffl-bench-airflow.")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from xffl_testbed.facilities import Facility, Testbed
from xffl_testbed.latency_relay import RelayProcess

log = logging.getLogger("benchmarks.transfer")

OPENSSH_OPTIONS = ["-B", "261120", "-R", "64"]


def write_random_file(path: Path, size_mb: int) -> None:
    with open(path, "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(size_mb))


class CpuMeter:
    """CPU seconds used here (this process, its threads and reaped children: sftp, ssh,
    sha256sum) and on the facility during each timed action; ``timed`` fills ``last``.

    The facility's side is its sshd and everything it starts, counted by a cgroup (v1
    ``cpuacct``) that the sshd is moved into: sshd does not wait for its session processes in a
    way that ``getrusage`` would see. Without that controller the facility's side is 0.
    """

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self) -> None:
        self.group: Path | None = None
        self.last: tuple[float, float] | None = None

    def watch(self, sshd_pid: int) -> None:
        group = self.ROOT / f"xffl-bench-transfer-{os.getpid()}"
        try:
            group.mkdir()
            (group / "cgroup.procs").write_text(f"{sshd_pid}\n")
        except OSError as error:
            log.warning("facility CPU not measured (cgroup cpuacct: %s)", error)
            return
        self.group = group

    def release(self) -> None:
        if self.group is None:
            return
        with contextlib.suppress(OSError):
            for pid in (self.group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.ROOT / "cgroup.procs").write_text(f"{pid}\n")
            self.group.rmdir()
        self.group = None

    def now(self) -> tuple[float, float]:
        import resource

        me, kids = (
            resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        client = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        facility = 0.0
        if self.group is not None:
            facility = int((self.group / "cpuacct.usage").read_text()) / 1e9
        return client, facility


CPU = CpuMeter()


def timed(action: Callable[[], object]) -> float:
    before = CPU.now()
    start = time.perf_counter()
    action()
    elapsed = time.perf_counter() - start
    time.sleep(0.3)  # the facility's session processes end
    after = CPU.now()
    CPU.last = (after[0] - before[0], after[1] - before[1])
    return elapsed


@dataclass(frozen=True)
class Endpoint:
    """Where the contenders connect: the facility's sshd, or the latency relay in front of it."""

    facility: Facility
    host: str
    port: int
    known_hosts: str  # a known_hosts file pinning the facility's host key for host:port

    @classmethod
    def of(cls, facility: Facility, host: str, port: int, folder: Path) -> Endpoint:
        path = folder / f"known_hosts.{port}"
        path.write_text(f"[{host}]:{port} {facility.host_key}\n")
        return cls(facility, host, port, str(path))

    @property
    def connection(self) -> dict:
        """The Airflow connection (JSON form) through this endpoint, host key pinned."""
        return dict(self.facility.connection, host=self.host, port=self.port)

    def options(self) -> list[str]:
        return [
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-i", self.facility.client_key,
        ]  # fmt: skip

    def ssh_argv(self, command: str) -> list[str]:
        destination = f"{self.facility.user}@{self.host}"
        return ["ssh", *self.options(), "-p", str(self.port), destination, command]


def openssh_batch(endpoint: Endpoint, commands: str) -> None:
    subprocess.run(
        ["sftp", "-q", "-b", "-", *OPENSSH_OPTIONS, *endpoint.options(),
         "-P", str(endpoint.port), f"{endpoint.facility.user}@{endpoint.host}"],
        input=commands, text=True, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip


def sha256sum(argv: list[str]) -> subprocess.Popen:
    """Starts ``argv`` (a ``sha256sum FILE``, here or over ssh); read it with ``digest_of``."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digest_of(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=3600)
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} failed ({process.returncode}): {err}")
    return out.split()[0]


def openssh_verified(endpoint: Endpoint, local: Path, remote: str, direction: str) -> None:
    """``sftp`` put or get, with sha256sum of the file at both ends: the source's while the
    file moves (a shell script could do no better), the destination's after it."""
    here, there = ["sha256sum", "--", str(local)], endpoint.ssh_argv(f"sha256sum -- {remote}")
    source, destination = (here, there) if direction == "put" else (there, here)
    source_hash = sha256sum(source)
    try:
        if direction == "put":
            openssh_batch(endpoint, f"put {local} {remote}\n")
        else:
            openssh_batch(endpoint, f"get {remote} {local}\n")
        theirs = digest_of(sha256sum(destination))
    finally:
        ours = digest_of(source_hash)
    if ours != theirs:
        raise RuntimeError(f"OpenSSH {direction}: sha256 {ours} at the source, {theirs} after")


def measure_rtt_ms(endpoint: Endpoint, rounds: int = 10) -> float:
    """The median time of one SFTP ``stat`` over an SSH connection to ``endpoint``, in ms."""
    import asyncio

    from xffl_airflow.ssh import connect, target_from_connection

    class Conn:  # what target_from_connection reads of an Airflow connection
        def __init__(self, spec: dict):
            self.conn_id = "bench"
            self.host, self.port, self.login = spec["host"], spec["port"], spec["login"]
            self.password = None
            self.extra_dejson = spec["extra"]

    async def rtt() -> float:
        async with await connect(target_from_connection(Conn(endpoint.connection))) as conn:
            async with conn.start_sftp_client() as sftp:
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    await sftp.stat(endpoint.facility.workdir)
                    times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    return round(asyncio.run(rtt()), 2)


def raw_tcp_mbps(port_of_sink: Callable[[int], int], size: int = 512 << 20) -> float:
    """Plain TCP throughput on loopback into a sink, through ``port_of_sink(sink_port)``."""
    sink = socket.create_server(("127.0.0.1", 0))

    def drain() -> None:
        conn, _ = sink.accept()
        with conn:
            buffer = bytearray(4 << 20)
            while conn.recv_into(buffer):
                pass
            conn.sendall(b"!")

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    data = os.urandom(4 << 20)
    with socket.create_connection(("127.0.0.1", port_of_sink(sink.getsockname()[1]))) as conn:
        start = time.perf_counter()
        for _ in range(size // len(data)):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        elapsed = time.perf_counter() - start
    thread.join(10)
    sink.close()
    return round(size / elapsed / 1e6, 1)


def relay_capacity(delay: float) -> dict[str, float]:
    """Raw TCP through a fresh relay with ``delay`` against direct loopback, MB/s."""
    relays: list[RelayProcess] = []

    def through_relay(port: int) -> int:
        relays.append(RelayProcess("127.0.0.1", port, delay=delay, max_seconds=120))
        return relays[-1].port

    try:
        return {
            "direct_raw_mbps": raw_tcp_mbps(lambda port: port),
            "relay_raw_mbps": raw_tcp_mbps(through_relay),
        }
    finally:
        for relay in relays:
            relay.stop()


def crypto_floor(size: int = 256 << 20, packet: int = 32 << 10) -> dict[str, float]:
    """CPU seconds per GB, on one core, of what any verified SSH transfer must compute: AES-GCM
    sealing and opening of 32 KiB packets (what an OpenSSH server takes) and sha256 (at each
    end), with the same libraries as ours (``cryptography``, ``hashlib``). Their sum, and the
    MB/s it allows with both cores on it, is the physical floor of this machine."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(packet)
    aead, nonce = AESGCM(os.urandom(16)), os.urandom(12)
    sealed = aead.encrypt(nonce, data, None)
    chunk = os.urandom(4 << 20)

    def per_gb(work: Callable[[], object], count: int, nbytes: int) -> float:
        start = time.process_time()
        for _ in range(count):
            work()
        return round((time.process_time() - start) / (count * nbytes / 1e9), 3)

    floor = {
        "aes128gcm_seal": per_gb(lambda: aead.encrypt(nonce, data, None), size // packet, packet),
        "aes128gcm_open": per_gb(lambda: aead.decrypt(nonce, sealed, None), size // packet, packet),
        "sha256": per_gb(lambda: hashlib.sha256(chunk).digest(), size // len(chunk), len(chunk)),
    }
    total = floor["aes128gcm_seal"] + floor["aes128gcm_open"] + 2 * floor["sha256"]
    floor["verified_transfer"] = round(total, 3)
    floor["mbps_on_2_cores"] = round(2 / total * 1000, 1)
    return floor


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class _NoDigest:
    """Stands in for hashlib.sha256 when timing the transport alone."""

    def update(self, data: bytes) -> None:
        pass

    def copy(self) -> _NoDigest:
        return self

    def hexdigest(self) -> str:
        return "0" * 64


class _NoRemoteHash:
    def __init__(self, *args: object):
        pass

    def advance(self, offset: int) -> None:
        pass

    async def finish(self, size: int) -> str:
        return "0" * 64

    async def abort(self) -> None:
        pass


@contextlib.contextmanager
def verification_skipped():
    """Within: push and pull hash nothing, here or on the facility (benchmark only)."""
    from xffl_airflow.transfer import runner, session

    async def no_sha256(self, path: str) -> str:
        return "0" * 64

    patches = [
        (runner.TransferRun, "fresh_digest", staticmethod(_NoDigest)),
        (session.FacilitySession, "growing_hash", lambda self, path: _NoRemoteHash()),
        (session.FacilitySession, "sha256", no_sha256),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]  # as defined
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-mb", type=int, default=1024, help="size of the file moved, MiB (default 1024)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of ours and OpenSSH per direction (default 3)"
    )
    parser.add_argument("--skip-sftphook", action="store_true", help="leave Airflow's SFTPHook out")
    parser.add_argument(
        "--unverified-too",
        action="store_true",
        help="also time ours with sha256 skipped on both sides (the transport alone)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=None,
        help="go through a latency relay adding this round-trip time (0: the relay, no delay)",
    )
    parser.add_argument(
        "--rate-mbps", type=float, default=None, help="with --rtt-ms: the relay's bandwidth cap"
    )
    parser.add_argument(
        "--skip-openssh-verified", action="store_true", help="leave OpenSSH + sha256sum out"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the CPU floor: cipher and sha256 seconds per GB (crypto_floor)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be positive")
    if args.rtt_ms is not None and args.rtt_ms < 0:
        parser.error("--rtt-ms must be >= 0")
    if args.rate_mbps is not None and args.rtt_ms is None:
        parser.error("--rate-mbps needs --rtt-ms")
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    if args.json:  # Airflow's log set-up prints to stdout: keep it to the JSON line
        for name in ("asyncssh", "xffl_airflow", "benchmarks"):
            logging.getLogger(name).setLevel(logging.WARNING)

    from xffl_airflow.transfer import RemoteFacility, pull, push

    loadavg_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="xffl-bench-transfer."))
    extra: dict[str, object] = {}
    relay: RelayProcess | None = None
    bed = Testbed.up(1, names=["bench"])
    try:
        facility = bed.facilities[0]
        endpoint = Endpoint.of(facility, facility.host, facility.ssh_port, work)
        if args.rtt_ms is not None:
            delay = args.rtt_ms / 2000
            extra.update(relay_capacity(delay))
            extra["rtt_direct_ms"] = measure_rtt_ms(endpoint)
            relay = RelayProcess(
                facility.host, facility.ssh_port, delay=delay, rate_mbps=args.rate_mbps,
                max_seconds=6 * 3600,
            )  # fmt: skip
            endpoint = Endpoint.of(facility, relay.host, relay.port, work)
            extra["rtt_measured_ms"] = measure_rtt_ms(endpoint)
        os.environ[f"AIRFLOW_CONN_{facility.conn_id.upper()}"] = json.dumps(endpoint.connection)
        site = RemoteFacility(
            name=facility.name, conn_id=facility.conn_id, workdir=facility.workdir
        )
        source = work / "model"
        source.mkdir()
        name = "model.bin"
        write_random_file(source / name, args.size_mb)
        size = (source / name).stat().st_size
        remote_dir = f"{facility.workdir}/bench"
        remote_file = f"{remote_dir}/{name}"
        back = work / "back"

        def clean_remote() -> None:
            facility.ssh(f"rm -rf {remote_dir} && mkdir -p {remote_dir}")

        def clean_local() -> None:
            shutil.rmtree(back, ignore_errors=True)
            back.mkdir()

        def ours_put() -> float:
            clean_remote()
            return timed(lambda: push(source, site, "bench"))

        def ours_get() -> float:
            clean_local()
            return timed(lambda: pull(site, "bench", back))

        def openssh_put() -> float:
            clean_remote()
            return timed(lambda: openssh_batch(endpoint, f"put {source / name} {remote_file}\n"))

        def openssh_get() -> float:
            clean_local()
            return timed(lambda: openssh_batch(endpoint, f"get {remote_file} {back / name}\n"))

        def openssh_verified_put() -> float:
            clean_remote()
            return timed(lambda: openssh_verified(endpoint, source / name, remote_file, "put"))

        def openssh_verified_get() -> float:
            clean_local()
            return timed(lambda: openssh_verified(endpoint, back / name, remote_file, "get"))

        def unverified(action: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                with verification_skipped():
                    return action()

            return run

        contenders = {"put": {"ours": ours_put, "openssh": openssh_put},
                      "get": {"ours": ours_get, "openssh": openssh_get}}  # fmt: skip
        if not args.skip_openssh_verified:
            contenders["put"]["openssh_verified"] = openssh_verified_put
            contenders["get"]["openssh_verified"] = openssh_verified_get
        if args.unverified_too:
            contenders["put"]["ours_unverified"] = unverified(ours_put)
            contenders["get"]["ours_unverified"] = unverified(ours_get)
        runs: dict[str, list[float]] = {
            f"{who}_{direction}": [] for direction in contenders for who in contenders[direction]
        }
        cpu = {key: {"client": [], "facility": []} for key in runs}  # CPU s per GB moved
        CPU.watch(facility.daemon_pid("sshd"))
        # a first copy on the facility for the gets; each put replaces it with the same bytes
        push(source, site, "bench")
        relay_cpu = cpu_seconds(relay.pid) if relay is not None else 0.0
        for rep in range(args.repeat):
            for direction, actions in contenders.items():
                order = list(actions)
                if rep % 2:
                    order.reverse()  # who goes first alternates
                for who in order:
                    runs[f"{who}_{direction}"].append(round(size / actions[who]() / 1e6, 1))
                    assert CPU.last is not None
                    for side, seconds in zip(("client", "facility"), CPU.last):
                        cpu[f"{who}_{direction}"][side].append(seconds / (size / 1e9))
            log.info("repetition %d: %s", rep + 1, {k: v[-1] for k, v in runs.items()})
        if relay is not None:
            relay_cpu = cpu_seconds(relay.pid) - relay_cpu
            moved = sum(len(v) for v in runs.values()) * size
            extra["relay_cpu_s_per_gb"] = round(relay_cpu / (moved / 1e9), 3)

        if not args.skip_sftphook:
            from airflow.providers.sftp.hooks.sftp import SFTPHook

            hook = SFTPHook(ssh_conn_id=facility.conn_id)
            clean_remote()
            runs["sftphook_put"] = [
                round(
                    size / timed(lambda: hook.store_file(remote_file, str(source / name))) / 1e6, 1
                )
            ]
            clean_local()
            runs["sftphook_get"] = [
                round(
                    size / timed(lambda: hook.retrieve_file(remote_file, str(back / name))) / 1e6, 1
                )
            ]
            hook.close_conn()
    finally:
        if relay is not None:
            relay.stop()
        CPU.release()
        bed.down(purge=True)
        shutil.rmtree(work, ignore_errors=True)

    result: dict[str, object] = {
        "benchmark": "transfer",
        "size_mb": args.size_mb,
        "repeat": args.repeat,
        "rtt_ms": args.rtt_ms,
    }
    if args.rate_mbps is not None:
        result["rate_mbps"] = args.rate_mbps
    result.update(extra)
    for key, values in runs.items():
        result[f"{key}_mbps"] = statistics.median(values)
    result["put_ratio"] = round(result["ours_put_mbps"] / result["openssh_put_mbps"], 3)
    result["get_ratio"] = round(result["ours_get_mbps"] / result["openssh_get_mbps"], 3)
    if not args.skip_openssh_verified:
        for direction in ("put", "get"):
            result[f"verified_{direction}_ratio"] = round(
                result[f"ours_{direction}_mbps"] / result[f"openssh_verified_{direction}_mbps"], 3
            )
    if args.unverified_too:
        for direction in ("put", "get"):
            result[f"unverified_{direction}_ratio"] = round(
                result[f"ours_unverified_{direction}_mbps"] / result[f"openssh_{direction}_mbps"], 3
            )
    if args.floor:
        result["floor_cpu_s_per_gb"] = crypto_floor()
    result["cpu_s_per_gb"] = {
        key: {side: round(statistics.median(v), 2) for side, v in sides.items()}
        for key, sides in cpu.items()
    }
    result["runs"] = runs
    result["cpus"] = os.cpu_count()
    result["loadavg_before"] = [round(x, 2) for x in loadavg_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
