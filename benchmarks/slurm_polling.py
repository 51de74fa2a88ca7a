"""Remote commands per minute with many concurrent SlurmJobTriggers on one facility.

    python benchmarks/slurm_polling.py --jobs 200 [--window 120] [--poll-interval 10]

Brings up one local facility of its own (``docker/facility/up``, needs root), submits jobs that
each sleep long enough to outlast the run (two run, the rest pend for resources), then runs
SlurmJobTriggers for them in one event loop, as a triggerer does: first for a single job (the
baseline), then for all ``--jobs`` of them, each for ``--window`` seconds. Remote commands are
counted where they are issued (``SlurmClient.run``), SSH connections where they are opened.
Prints one JSON line; stops the facility (by PID, ``docker/facility/down``) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from xffl_airflow.hooks import slurm_poller
from xffl_airflow.hooks.slurm import remote_command_count
from xffl_airflow.triggers.slurm import SlurmJobTrigger

from xffl_testbed.facilities import Testbed, facility_python


def submit_jobs(facility, count: int, seconds: int) -> list[str]:
    """``count`` jobs that print a line a second; two run at a time, the rest pend."""
    script = f"for i in $(seq 1 {seconds}); do echo tick $i; sleep 1; done"
    out = facility.ssh(
        f"cd xffl && for n in $(seq 1 {count}); do sbatch --parsable -J bench --output=bench-%j.log "
        f"--wrap '{script}'; done",
        timeout=600,
    ).stdout.split()
    if len(out) != count or not all(job.isdigit() for job in out):
        raise RuntimeError(f"expected {count} job ids from sbatch, got {out[:5]}...")
    return out


async def watch(
    conn_id: str, job_ids: list[str], *, window: float, poll_interval: float, log_dir: str
) -> dict:
    """Runs one trigger per job for ``window`` seconds; counts commands, connections, CPU."""
    connections = 0
    original = slurm_poller._default_connector

    async def counting_connector(conn_id: str):
        nonlocal connections
        connections += 1
        return await original(conn_id)

    slurm_poller._default_connector = counting_connector
    try:
        commands_at_start = remote_command_count(conn_id)
        cpu_at_start, started = time.process_time(), time.monotonic()
        marks: list[tuple[float, int]] = []
        triggers = [
            SlurmJobTrigger(
                ssh_conn_id=conn_id,
                job_id=job_id,
                log_path=f"{log_dir}/bench-{job_id}.log",
                poll_interval=poll_interval,
            )
            for job_id in job_ids
        ]

        async def first(trigger):
            async for event in trigger.run():
                return event.payload

        tasks = [asyncio.create_task(first(t)) for t in triggers]
        while time.monotonic() - started < window:
            await asyncio.sleep(1)
            marks.append(
                (time.monotonic() - started, remote_command_count(conn_id) - commands_at_start)
            )
        ended_early = [t for t in tasks if t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - started
        commands = remote_command_count(conn_id) - commands_at_start
        # the steady state: the last minute (or the last half of a shorter window)
        tail_from = max(elapsed - 60, elapsed / 2)
        before_tail = max((count for at, count in marks if at <= tail_from), default=0)
        return {
            "triggers": len(job_ids),
            "window_s": round(elapsed, 1),
            "remote_commands": commands,
            "commands_per_min": round(commands * 60 / elapsed, 2),
            "steady_commands_per_min": round(
                (commands - before_tail) * 60 / (elapsed - tail_from), 2
            ),
            "ssh_connections": connections,
            "cpu_s": round(time.process_time() - cpu_at_start, 2),
            "events_before_window_end": len(ended_early),
        }
    finally:
        slurm_poller._default_connector = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs", type=int, default=200, help="concurrent triggers (one job each) on one facility"
    )
    parser.add_argument("--window", type=float, default=120, help="seconds each measurement lasts")
    parser.add_argument(
        "--poll-interval", type=float, default=10, help="the triggers' poll_interval"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("slurm_polling.py brings up a local facility: run it as root")
    # the jobs' log lines (the triggers' INFO lines) would drown the one JSON line
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    python = facility_python()
    bed = Testbed.up(1, names=["bench"], python=python if Path(python).exists() else None)
    try:
        facility = bed.facilities[0]
        for name, value in bed.airflow_env().items():
            os.environ[name] = value
        job_seconds = int(2 * args.window + 120)  # outlast both measurements
        single_job = submit_jobs(facility, 1, job_seconds)
        single = asyncio.run(watch(facility.conn_id, single_job, window=args.window,
                                   poll_interval=args.poll_interval, log_dir=facility.workdir))  # fmt: skip
        many_jobs = submit_jobs(facility, args.jobs, job_seconds)
        many = asyncio.run(watch(facility.conn_id, many_jobs, window=args.window,
                                 poll_interval=args.poll_interval, log_dir=facility.workdir))  # fmt: skip
        queue = facility.ssh("squeue -h --me -o %T | sort | uniq -c").stdout.split()
    finally:
        bed.down(purge=True)
    print(
        json.dumps(
            {
                "benchmark": "slurm_polling",
                "facility": "one local facility (Slurm 22.05 behind sshd on loopback)",
                "machine": f"{os.cpu_count()} cores, shared with other work",
                "poll_interval_s": args.poll_interval,
                "single_job": single,
                "many_jobs": many,
                "queue_at_end": dict(zip(queue[1::2], map(int, queue[0::2]))),
                "commands_per_min_ratio": round(
                    many["commands_per_min"] / single["commands_per_min"], 2
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
