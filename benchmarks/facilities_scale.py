"""Bring-up time and daemon memory of many local facilities, against one-at-a-time start-up.

    python benchmarks/facilities_scale.py --facilities 32 --json

Brings up ``--facilities`` local facilities with ``docker/facility/up`` twice in one run: first
one facility at a time (``--parallel 1``, the baseline), then with the daemons of
``--parallel`` facilities starting at once (ours). For ours it also asks every facility over
ssh for its node's state, reads each daemon's memory from ``/proc`` (PSS from
``smaps_rollup``, RSS from ``status``; summed per kind: slurmctld, slurmd, sshd, munged) and
their CPU time over ``--idle-s`` idle seconds, then times ``down``. Needs root. Prints one JSON
line with the machine's load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from xffl_testbed.facilities import Testbed, facility_python  # noqa: E402

KINDS = ("slurmctld", "slurmd", "sshd", "munged")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among their users), KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError(f"no Pss in /proc/{pid}/smaps_rollup")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def daemon_pids(testbed: Testbed) -> dict[str, list[int]]:
    """Each kind's recorded PIDs (the listener of each sshd, not its sessions)."""
    pids: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for path in list(testbed.run_dir.glob("pids/*.pid")) + list(
        testbed.run_dir.glob("*/pids/*.pid")
    ):
        kind = path.stem
        if kind in pids:
            pids[kind].append(int(path.read_text()))
    return pids


def memory(pids: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {
        kind: {
            "count": len(found),
            "pss_mib": round(sum(pss_kib(p) for p in found) / 1024, 1),
            "rss_mib": round(sum(rss_kib(p) for p in found) / 1024, 1),
        }
        for kind, found in pids.items()
    }


def idle_cpu_percent(pids: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """Per kind, the CPU the daemons used while idle, in percent of one core."""
    before = {kind: sum(cpu_s(p) for p in found) for kind, found in pids.items()}
    time.sleep(seconds)
    return {
        kind: round(100 * (sum(cpu_s(p) for p in found) - before[kind]) / seconds, 2)
        for kind, found in pids.items()
    }


def nodes_idle(testbed: Testbed) -> int:
    """How many facilities answer over ssh with their node idle."""

    def state(facility) -> str:
        return facility.ssh("sinfo -h -N -o %T", timeout=120).stdout.strip()

    with ThreadPoolExecutor(8) as pool:
        return sum(s == "idle" for s in pool.map(state, testbed.facilities))


def timed_up(count: int, parallel: int, python: str) -> tuple[Testbed, float]:
    began = time.monotonic()
    testbed = Testbed.up(count, python=python, parallel=parallel)
    return testbed, time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", type=int, default=32)
    parser.add_argument(
        "--parallel", type=int, default=8, help="facilities starting at once (ours)"
    )
    parser.add_argument("--idle-s", type=float, default=20.0, help="seconds of idle CPU measured")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the one-at-a-time bring-up"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    python = facility_python()
    result: dict = {
        "facilities": args.facilities,
        "parallel": args.parallel,
        "loadavg_before": loadavg(),
    }
    if not args.no_baseline:
        testbed, seconds = timed_up(args.facilities, 1, python)
        testbed.down(purge=True)
        result["baseline_one_at_a_time_up_s"] = round(seconds, 1)
    testbed, seconds = timed_up(args.facilities, args.parallel, python)
    try:
        result["up_s"] = round(seconds, 1)
        result["nodes_idle_over_ssh"] = nodes_idle(testbed)
        pids = daemon_pids(testbed)
        result["memory"] = memory(pids)
        result["total_pss_mib"] = round(sum(m["pss_mib"] for m in result["memory"].values()), 1)
        result["idle_cpu_percent_of_a_core"] = idle_cpu_percent(pids, args.idle_s)
    finally:
        began = time.monotonic()
        testbed.down(purge=True)
        result["down_s"] = round(time.monotonic() - began, 1)
    result["loadavg_after"] = loadavg()
    if not args.json:
        print(f"{args.facilities} facilities up in {result['up_s']} s", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
