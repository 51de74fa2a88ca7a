"""A campaign across many real local facilities with the shipped settings: rounds, retries, races.

    python benchmarks/scale_campaign.py --facilities 32 --rounds 3 --json

Brings up ``--facilities`` local facilities (``docker/facility/up``: each its own slurmctld,
slurmd, sshd and Unix user) and a fresh Airflow of its own (``AirflowInstance`` with its
defaults; ``[core] parallelism`` sized as docs/federation.md asks: the facilities + 4), its
metadata on PostgreSQL as docs/deployment.md asks of production (``--database sqlite``: the
embedded SQLite, which at 32 facilities on a busy 2-core machine lost its scheduler to
"database is locked"; see docs/scale.md). The
federation config leaves ``retry`` and every other setting at the defaults of
``federation/config.py``; only the training command is the no-op of
``benchmarks/round_overhead.py`` (sleep 1 s, hand the model back). It runs ``--rounds``
rounds and then checks, through the REST API and the logs:

- every round run succeeded, with every facility among its participants (no round lost);
- every task instance: its state and ``try_number``; for each try beyond the first, why (the
  "state mismatch" entries Airflow's event log holds for it, else the first try's last error);
- the scheduler log's count of Airflow's deferral race ("finished with state success, but the
  task instance's state attribute is");
- the Slurm jobs each facility ran (its completion log): one per round means no retry
  submitted training again.

Prints one JSON line. Needs root. The machine's load average is part of the line: on a shared
machine the wall times are longer than on an idle one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins"), str(REPO / "benchmarks")]

from round_overhead import SLEEP_COMMAND, run_seconds  # noqa: E402

from xffl_testbed.airflow_instance import AirflowError, AirflowInstance  # noqa: E402
from xffl_testbed.campaign import (  # noqa: E402
    LocalFacility,
    install_federation_dag,
    make_tiny,
    wait_for_campaign,
    write_config,
)
from xffl_testbed.facilities import Testbed, facility_python  # noqa: E402
from xffl_testbed.postgres import PostgresServer  # noqa: E402

T = TypeVar("T")
RACE = "finished with state success, but the task instance's state attribute is"


class Patient:
    """Calls the REST API again when it answers HTTP 500 or not at all: under load the SQLite
    metadata database is busy now and then ("database is locked"), as Airflow's own task
    client also meets and retries. Counts the answers it waited out."""

    def __init__(self, *, attempts: int = 60, pause: float = 2.0):
        self.attempts, self.pause, self.waited_out = attempts, pause, 0

    def __call__(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.attempts):
            try:
                return call(*args, **kwargs)
            except (AirflowError, httpx.HTTPError) as error:
                transient = isinstance(error, httpx.HTTPError) or " 500 " in str(error)
                if not transient or attempt == self.attempts - 1:
                    raise
                self.waited_out += 1
                time.sleep(self.pause)
        raise AssertionError("unreachable")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def shipped_config(path: Path, *, campaign: str, storage: Path, base_model: Path, testbed: Testbed,
                   python: str, rounds: int) -> Path:  # fmt: skip
    """A federation config for every facility of ``testbed`` with the shipped defaults."""
    write_config(
        path, campaign=campaign, storage=storage, base_model=base_model, python=python,
        facilities=[LocalFacility(facility=f, data="/nonexistent") for f in testbed.facilities],
        training={"command": SLEEP_COMMAND}, convergence={"max_rounds": rounds},
    )  # fmt: skip
    config = yaml.safe_load(path.read_text())
    del config["retry"]  # write_config's test retries; the shipped ones apply instead
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def slurm_jobs(testbed: Testbed) -> dict[str, int]:
    """How many jobs each facility's slurmctld recorded as ended (jobcomp/filetxt)."""
    counts = {}
    for facility in testbed.facilities:
        log = Path(facility.facility_dir) / "log" / "jobcomp.txt"
        counts[facility.name] = sum(1 for line in log.read_text().splitlines() if "JobId=" in line)
    return counts


def why_retried(airflow: AirflowInstance, dag_id: str, ti: dict, patient: Patient) -> str:
    """The reason of a try beyond the first: Airflow's state-mismatch entry, else the first
    try's last error line."""
    events = patient(airflow.api, "GET", "eventLogs", params={
        "dag_id": dag_id, "run_id": ti["dag_run_id"], "task_id": ti["task_id"], "limit": 50,
    })["event_logs"]  # fmt: skip
    mismatch = [e for e in events if e["event"] == "state mismatch"]
    if mismatch:
        return "state mismatch: " + (mismatch[0].get("extra") or "")[:300]
    try:
        log = patient(airflow.task_log, dag_id, ti["dag_run_id"], ti["task_id"], try_number=1)
    except Exception as error:  # noqa: BLE001 - the report says it could not tell
        return f"first try's log unreadable: {error}"[:300]
    errors = [line for line in log.splitlines() if re.search(r"error|exception|failed", line, re.I)]
    return (errors[-1] if errors else "no error in the first try's log")[:300]


def tries_summary(retried: list[dict]) -> dict:
    """Tries beyond the first, counted by task kind (``push``, ``train``, ...), the task's
    final state and the reason's kind ("state mismatch (queued)" for Airflow's race)."""
    kinds: Counter = Counter()
    for entry in retried:
        why = entry["why"]
        match = re.search(r"state attribute is (\w+)", why)
        reason = f"state mismatch ({match.group(1)})" if match else why[:80]
        kinds[f"{entry['task'].rsplit('.', 1)[-1]} -> {entry['state']}: {reason}"] += 1
    return {"count": len(retried), "max_try_number": max((e["try_number"] for e in retried), default=1),
            "by_task_and_reason": dict(kinds)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facilities", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--database", choices=("postgres", "sqlite"), default="postgres",
        help="Airflow's metadata database: PostgreSQL (production, docs/deployment.md) or the "
        "embedded SQLite",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (logs) afterwards"
    )
    args = parser.parse_args()
    # a plain `kill` still stops Airflow, the database and the facilities (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    count, rounds = args.facilities, args.rounds
    python = facility_python()
    work = Path(tempfile.mkdtemp(prefix="xffl-bench-scale."))
    result: dict = {"facilities": count, "rounds": rounds, "database": args.database,
                    "loadavg_before": loadavg()}  # fmt: skip
    began = time.monotonic()
    testbed = Testbed.up(count, python=python)
    result["facilities_up_s"] = round(time.monotonic() - began, 1)
    airflow, patient, postgres = None, Patient(), None
    try:
        campaign = f"scale{count}"
        storage = work / "campaigns"
        config = shipped_config(work / f"{campaign}.yaml", campaign=campaign, storage=storage,
                                base_model=make_tiny(work / "tiny") / "model", testbed=testbed,
                                python=python, rounds=rounds)  # fmt: skip
        dags = work / "dags"
        dags.mkdir()
        install_federation_dag(dags, config, name=campaign)
        if args.database == "postgres":
            postgres = PostgresServer().start()  # its own folder, which its system user reaches
        airflow = AirflowInstance(
            work / "airflow", dags_folder=dags, env=testbed.airflow_env(), parallelism=count + 4,
            sql_alchemy_conn=postgres.url if postgres else None,
        )  # fmt: skip
        airflow.migrate()
        airflow.start()
        dag_id = f"xffl_{campaign}"
        patient(airflow.wait_for_dag, dag_id, timeout=600)
        patient(airflow.trigger, dag_id, run_id=f"xffl__{campaign}__round-0000", conf={"round": 0})
        deadline = time.monotonic() + 600 + 300 * rounds
        runs = patient(wait_for_campaign, airflow, dag_id, campaign, storage / campaign,
                       timeout=deadline - time.monotonic())  # fmt: skip
        result["run_states"] = dict(Counter(r["state"] for r in runs))
        result["round_wall_s"] = [round(run_seconds(r), 1) for r in runs]
        participants = []
        for run in runs:
            number = int(run["dag_run_id"].rsplit("-", 1)[1])
            manifest = storage / campaign / f"round-{number:04d}" / "manifest.json"
            participants.append(
                len(json.loads(manifest.read_text())["participants"]) if manifest.is_file() else 0
            )
        result["participants_per_round"] = participants
        result["rounds_lost"] = sum(
            1
            for r, p in zip(runs, participants, strict=True)
            if r["state"] != "success" or p != count
        )
        states, retried = Counter(), []
        for run in runs:
            for ti in patient(airflow.task_instances, dag_id, run["dag_run_id"]):
                states[ti["state"]] += 1
                if ti["try_number"] > 1:
                    retried.append({"run": run["dag_run_id"], "task": ti["task_id"], "try_number": ti["try_number"],
                                    "state": ti["state"], "why": why_retried(airflow, dag_id, ti, patient)})  # fmt: skip
        result["task_states"] = dict(states)
        result["failed_task_instances"] = states.get("failed", 0)
        result["tries_beyond_first"] = tries_summary(retried)
        for entry in retried:  # each one in full, beside the line
            print(json.dumps(entry), file=sys.stderr)
        scheduler_log = airflow.component_log("scheduler")
        result["race_in_scheduler_log"] = scheduler_log.count(RACE)
        raced = re.findall(
            r"<TaskInstance: (\S+ \S+) \[\w+\][^>]*> " + re.escape(RACE), scheduler_log
        )
        result["race_task_instances"] = len(set(raced))
        jobs = slurm_jobs(testbed)
        result["slurm_jobs_total"] = sum(jobs.values())
        result["facilities_with_more_jobs_than_rounds"] = {
            n: c for n, c in jobs.items() if c != rounds
        }
        result["api_answers_waited_out"] = patient.waited_out
        result["settings"] = {"parallelism": count + 4, "train_retries": "config default",
                              "min_heartbeat_interval": airflow.env.get("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL")}  # fmt: skip
    finally:
        if airflow is not None:
            airflow.stop()
        if postgres is not None:
            postgres.purge()
        testbed.down(purge=True)
        result["loadavg_after"] = loadavg()
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result.get("rounds_lost") == 0 and result.get("failed_task_instances") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
