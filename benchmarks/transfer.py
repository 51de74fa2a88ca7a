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

With ``--unverified-too`` it also times ours with sha256 replaced by a no-op on both sides
(``ours_unverified_put_mbps``/``..._get_mbps``): the transport alone, to tell its cost from the
verification's. That is a measurement only, never a mode of the product.

Ours and OpenSSH alternate ``--repeat`` times (who goes first alternates too) and the medians
are reported; every single figure is in ``runs``. One JSON line on stdout. MB/s are 10**6
bytes per second. The destination is removed before each run, so nothing is skipped.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

if "AIRFLOW_HOME" not in os.environ:  # a throw-away home: the connection comes from the env
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="xffl-bench-airflow.")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from xffl_testbed.facilities import Facility, Testbed

log = logging.getLogger("benchmarks.transfer")

OPENSSH_OPTIONS = ["-B", "261120", "-R", "64"]


def write_random_file(path: Path, size_mb: int) -> None:
    with open(path, "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(size_mb))


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def openssh_batch(facility: Facility, commands: str) -> None:
    subprocess.run(
        ["sftp", "-q", "-b", "-", *OPENSSH_OPTIONS,
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={facility.known_hosts_file()}",
         "-i", facility.client_key, "-P", str(facility.ssh_port), f"{facility.user}@{facility.host}"],
        input=commands, text=True, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip


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
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be positive")
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    if args.json:  # Airflow's log set-up prints to stdout: keep it to the JSON line
        for name in ("asyncssh", "xffl_airflow", "benchmarks"):
            logging.getLogger(name).setLevel(logging.WARNING)

    from xffl_airflow.transfer import RemoteFacility, pull, push

    loadavg_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="xffl-bench-transfer."))
    bed = Testbed.up(1, names=["bench"])
    try:
        facility = bed.facilities[0]
        os.environ[f"AIRFLOW_CONN_{facility.conn_id.upper()}"] = json.dumps(facility.connection)
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
            return timed(lambda: openssh_batch(facility, f"put {source / name} {remote_file}\n"))

        def openssh_get() -> float:
            clean_local()
            return timed(lambda: openssh_batch(facility, f"get {remote_file} {back / name}\n"))

        def unverified(action: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                with verification_skipped():
                    return action()

            return run

        contenders = {"put": {"ours": ours_put, "openssh": openssh_put},
                      "get": {"ours": ours_get, "openssh": openssh_get}}  # fmt: skip
        if args.unverified_too:
            contenders["put"]["ours_unverified"] = unverified(ours_put)
            contenders["get"]["ours_unverified"] = unverified(ours_get)
        runs: dict[str, list[float]] = {
            f"{who}_{direction}": [] for direction in contenders for who in contenders[direction]
        }
        # a first copy on the facility for the gets; each put replaces it with the same bytes
        push(source, site, "bench")
        for rep in range(args.repeat):
            for direction, actions in contenders.items():
                order = list(actions)
                if rep % 2:
                    order.reverse()  # who goes first alternates
                for who in order:
                    runs[f"{who}_{direction}"].append(round(size / actions[who]() / 1e6, 1))
            log.info("repetition %d: %s", rep + 1, {k: v[-1] for k, v in runs.items()})

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
        bed.down(purge=True)
        shutil.rmtree(work, ignore_errors=True)

    result: dict[str, object] = {
        "benchmark": "transfer",
        "size_mb": args.size_mb,
        "repeat": args.repeat,
    }
    for key, values in runs.items():
        result[f"{key}_mbps"] = statistics.median(values)
    result["put_ratio"] = round(result["ours_put_mbps"] / result["openssh_put_mbps"], 3)
    result["get_ratio"] = round(result["ours_get_mbps"] / result["openssh_get_mbps"], 3)
    if args.unverified_too:
        for direction in ("put", "get"):
            result[f"unverified_{direction}_ratio"] = round(
                result[f"ours_unverified_{direction}_mbps"] / result[f"openssh_{direction}_mbps"], 3
            )
    result["runs"] = runs
    result["cpus"] = os.cpu_count()
    result["loadavg_before"] = [round(x, 2) for x in loadavg_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
