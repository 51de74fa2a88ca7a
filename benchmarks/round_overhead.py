"""Round overhead of the federation DAG against Airflow's own floor, in one run.

    python benchmarks/round_overhead.py --facilities 2,8 --json

For each facility count it starts a fresh Airflow (SQLite, LocalExecutor, the latency
settings the demo ships; ``--database postgres`` puts its metadata on PostgreSQL) beside one
local Slurm facility that every facility entry shares, and runs, in the same instance:

- ours: rounds of the real federation DAG (push the tiny model over SFTP, a Slurm job whose
  training command sleeps 1 s and hands the model back with its metrics, pull, aggregate,
  manifest, report, self-trigger);
- the floor: the same DAG shape with no-op tasks and a 1 s deferral (round_floor_dag.py).

Round wall time is the DAG run's end minus its start; overhead is that minus the 1 s of
"training". It prints one JSON line per facility count with the median over the rounds after
the first (the first pays one-off costs such as DAG parsing by the workers), and the CPU
seconds the Airflow components and every process they started spent per round and per task
instance (``cpu_s_per_round``, ``cpu_s_per_task``: user plus system, the reaped task
processes included), and each kind of task's median wall seconds (``ours_task_s``,
``floor_task_s``), for ours and for the floor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from xffl_testbed.airflow_instance import AirflowInstance  # noqa: E402
from xffl_testbed.campaign import (  # noqa: E402
    LocalFacility,
    install_federation_dag,
    make_tiny,
    wait_for_campaign,
    write_config,
)
from xffl_testbed.facilities import Testbed, facility_python  # noqa: E402
from xffl_testbed.postgres import PostgresServer  # noqa: E402

SLEEP_COMMAND = (
    "sleep 1 && rm -rf {out}.part && mkdir -p {out}.part && cp {model}/* {out}.part/ && "
    "printf '%s' '{{\"num_samples\": 1, \"num_tokens\": 1, \"val_loss_before\": 1.0, \"val_loss_after\": 1.0}}' "
    "> {out}.part/metrics.json && mv {out}.part {out}"
)


def run_seconds(run: dict) -> float:
    start = datetime.fromisoformat(run["start_date"])
    end = datetime.fromisoformat(run["end_date"])
    return (end - start).total_seconds()


def airflow_cpu_seconds(airflow) -> float:
    """User plus system CPU seconds of the Airflow components and their descendants so far
    (live ones directly, ended ones through their parents' children times)."""
    import psutil

    total = 0.0
    for process in airflow.processes.values():
        try:
            root = psutil.Process(process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in tree:
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def cpu_figures(seconds: float, runs: list[dict], task_count: int) -> dict:
    return {"cpu_s_per_round": round(seconds / len(runs), 2),
            "cpu_s_per_task": round(seconds / max(1, task_count), 3)}  # fmt: skip


def task_seconds(airflow, dag_id: str, runs: list[dict]) -> dict[str, float]:
    """Median wall seconds of each kind of task (its id without the facility group), over the
    rounds after the first: where a round's time goes, task by task."""
    spans: dict[str, list[float]] = {}
    measured = sorted(runs, key=lambda r: r["start_date"])[1:] or runs
    for run in measured:
        for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
            if ti.get("start_date") and ti.get("end_date"):
                seconds = (datetime.fromisoformat(ti["end_date"]) - datetime.fromisoformat(ti["start_date"])).total_seconds()
                spans.setdefault(ti["task_id"].rsplit(".", 1)[-1], []).append(seconds)
    return {kind: round(statistics.median(values), 2) for kind, values in sorted(spans.items())}


def median_overhead(runs: list[dict]) -> tuple[float, list[float]]:
    walls = [run_seconds(r) for r in sorted(runs, key=lambda r: r["start_date"])]
    measured = walls[1:] if len(walls) > 1 else walls
    return statistics.median(measured) - 1.0, walls


def bench(count: int, rounds: int, work: Path, python: str, facility) -> dict:
    tiny = make_tiny(work / "tiny")
    storage = work / f"campaigns-{count}"
    entries = [
        LocalFacility(facility=facility, data="/nonexistent", name=f"f{i}", workdir=f"{facility.workdir}/f{i}")
        for i in range(count)
    ]
    for entry in entries:
        Path(entry.workdir).mkdir(parents=True, exist_ok=True)
        shutil.chown(entry.workdir, facility.user, facility.user)
    config = write_config(
        work / f"bench-{count}.yaml",
        campaign=f"bench{count}",
        storage=storage,
        base_model=tiny / "model",
        facilities=entries,
        python=python,
        training={"command": SLEEP_COMMAND},
        convergence={"max_rounds": rounds},
        retry={"retries": 1, "retry_delay_s": 1, "max_retry_delay_s": 5, "train_timeout_h": 1},
    )
    dags = work / f"dags-{count}"
    dags.mkdir()
    install_federation_dag(dags, config, name=f"bench{count}")
    floor = (REPO / "benchmarks" / "round_floor_dag.py").read_text()
    floor = floor.replace("FACILITIES = 2  #", f"FACILITIES = {count}  #").replace("ROUNDS = 3  #", f"ROUNDS = {rounds}  #")
    (dags / f"round_floor_{count}.py").write_text(floor)
    postgres = None
    if DATABASE == "postgres":
        postgres = PostgresServer().start()  # its own folder, which its system user reaches
    airflow = AirflowInstance(
        work / f"airflow-{count}", dags_folder=dags, env=testbed_env, parallelism=max(8, count + 4),
        sql_alchemy_conn=postgres.url if postgres else None,
    )  # fmt: skip
    try:
        airflow.migrate()
        airflow.start()
        ours_id, floor_id = f"xffl_bench{count}", f"xffl_floor_{count}"
        airflow.wait_for_dag(ours_id, timeout=300)
        airflow.wait_for_dag(floor_id, timeout=300)
        # the floor first, then ours, on the same warm instance
        cpu_start = airflow_cpu_seconds(airflow)
        airflow.trigger(floor_id, run_id="floor__round-0", conf={"round": 0})
        deadline = time.monotonic() + 900
        while True:
            floor_runs = [r for r in airflow.dag_runs(floor_id)]
            done = [r for r in floor_runs if r["state"] in ("success", "failed")]
            if len(done) >= rounds or any(r["state"] == "failed" for r in done):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"floor DAG did not finish {rounds} rounds")
            time.sleep(1)
        time.sleep(5)  # the floor's last task processes reaped
        cpu_floor = airflow_cpu_seconds(airflow)
        airflow.trigger(ours_id, run_id=f"xffl__bench{count}__round-0000", conf={"round": 0})
        ours_runs = wait_for_campaign(airflow, ours_id, f"bench{count}", storage / f"bench{count}", timeout=1800)
        time.sleep(5)
        cpu_ours = airflow_cpu_seconds(airflow)
        tasks = {dag_id: sum(len(airflow.task_instances(dag_id, r["dag_run_id"])) for r in dag_runs)
                 for dag_id, dag_runs in ((ours_id, ours_runs), (floor_id, floor_runs))}  # fmt: skip
        failed = [r["dag_run_id"] for r in ours_runs + floor_runs if r["state"] != "success"]
        if failed:
            raise RuntimeError(f"runs failed: {failed}; logs under {airflow.home / 'logs'}")
        if TIMELINE:
            for dag_id, run in ((ours_id, ours_runs[-1]), (floor_id, floor_runs[-1])):
                print_timeline(airflow, dag_id, run)
        ours, ours_walls = median_overhead(ours_runs)
        floor_overhead, floor_walls = median_overhead(floor_runs)
        return {
            "facilities": count,
            "rounds": rounds,
            "database": DATABASE,
            "loadavg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
            "ours_overhead_s": round(ours, 2),
            "floor_overhead_s": round(floor_overhead, 2),
            "ratio": round(ours / floor_overhead, 3) if floor_overhead > 0 else None,
            "ours_round_wall_s": [round(w, 2) for w in ours_walls],
            "floor_round_wall_s": [round(w, 2) for w in floor_walls],
            "ours_cpu": cpu_figures(cpu_ours - cpu_floor, ours_runs, tasks[ours_id]),
            "floor_cpu": cpu_figures(cpu_floor - cpu_start, floor_runs, tasks[floor_id]),
            "ours_task_s": task_seconds(airflow, ours_id, ours_runs),
            "floor_task_s": task_seconds(airflow, floor_id, floor_runs),
        }
    finally:
        airflow.stop()
        if postgres is not None:
            postgres.purge()


testbed_env: dict[str, str] = {}
TIMELINE = False
DATABASE = "sqlite"


def print_timeline(airflow, dag_id: str, run: dict) -> None:
    """Each task's start and end, in seconds from the run's start (to stderr)."""
    start = datetime.fromisoformat(run["start_date"])
    rows = []
    for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
        if ti.get("start_date") and ti.get("end_date"):
            rows.append((
                (datetime.fromisoformat(ti["start_date"]) - start).total_seconds(),
                (datetime.fromisoformat(ti["end_date"]) - start).total_seconds(),
                ti["task_id"], ti["try_number"],
            ))  # fmt: skip
    print(f"-- {dag_id} {run['dag_run_id']}: {run_seconds(run):.2f} s", file=sys.stderr)
    for began, ended, task_id, tries in sorted(rows):
        print(f"   {began:7.2f} {ended:7.2f} {ended - began:6.2f}  {task_id} (try {tries})", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", default="2,8", help="comma-separated facility counts")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per DAG (the first is not counted)")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")
    parser.add_argument("--timeline", action="store_true", help="print the last round's task timeline to stderr")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres"), default="sqlite",
        help="Airflow's metadata database (default the embedded SQLite)",
    )  # fmt: skip
    args = parser.parse_args()
    global TIMELINE, DATABASE
    TIMELINE, DATABASE = args.timeline, args.database
    # a plain `kill` still stops Airflow and the facility (the finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    python = facility_python()
    work = Path(tempfile.mkdtemp(prefix="xffl-bench-round."))
    testbed = Testbed.up(1, names=["shared"], python=python, node_cpus=64)
    try:
        testbed_env.update(testbed.airflow_env())
        for count in [int(c) for c in args.facilities.split(",")]:
            result = bench(count, args.rounds, work, python, testbed.facilities[0])
            print(json.dumps(result), flush=True)
    finally:
        testbed.down(purge=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
