"""A chaos campaign: the same federated campaign, calm and then under random faults.

    python benchmarks/chaos_campaign.py --seed 1

Starts two local facilities (``docker/facility/up``: Slurm behind sshd) and a fresh Airflow
(api-server, scheduler, dag-processor, triggerer on SQLite, the preloading LocalExecutor), and
runs in that instance, one after the other:

- calm: a campaign of ``--rounds`` rounds with nothing disturbed; its duration sets the window
  the faults are drawn in;
- chaos: the same config under another campaign name, while a nemesis injects the faults that
  ``xffl_testbed.chaos.fault_schedule`` draws from ``--seed``: SIGKILL of the scheduler, the
  triggerer, the dag-processor, of a running push, pull, aggregate or finalize task's process;
  a facility's sshd stopped for some seconds; a facility's slurmctld stopped and started again.
  A supervisor starts the Airflow components that exited again, every second, as systemd would.

Then it checks the promise (``xffl_testbed.chaos.outcome_problems``): every round succeeded;
the final global model's sha256 equals the calm run's; each round ran exactly one Slurm job per
facility (from the facilities' own completion logs); the manifest chain verifies; no unfinished
file is left in the campaign's storage or at the facilities. It prints the seed, every fault
with its time (seconds from the chaos campaign's start) and the outcome as one JSON line, and
exits 1 when the promise was broken. Everything it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from xffl_testbed.airflow_instance import AirflowInstance  # noqa: E402
from xffl_testbed.campaign import (  # noqa: E402
    LocalFacility,
    make_tiny,
    place_private_data,
    start_campaign,
    wait_for_campaign,
    write_config,
)
from xffl_testbed.chaos import (  # noqa: E402
    FAULT_KINDS,
    Fault,
    fault_schedule,
    jobs_per_round,
    model_digest,
    outcome_problems,
    parse_counts,
    parse_jobcomp,
    partial_paths,
)
from xffl_testbed.facilities import Facility, Testbed, facility_python  # noqa: E402
from xffl_testbed.processes import alive  # noqa: E402

log = logging.getLogger("chaos")

# The benchmark's faults per chaos campaign: each kind several times.
DEFAULT_COUNTS = {
    "kill_scheduler": 2,
    "kill_triggerer": 2,
    "kill_dag_processor": 2,
    "kill_task": 4,
    "sshd_outage": 2,
    "slurmctld_restart": 2,
}
TRAINING = {
    "max_steps": 20,
    "learning_rate": 0.003,
    "threads": 1,
    "seed": 0,
    "batch_size": 8,
    "seq_len": 64,
}
# Enough retries for the tasks the faults hit, with short delays (the shipped defaults wait
# 30 s and more: right for days-long campaigns, slow for a benchmark).
RETRY = {"retries": 4, "retry_delay_s": 2, "max_retry_delay_s": 10, "train_timeout_h": 1}
NAMES = ("chaosa", "chaosb")


# -- the live pieces --------------------------------------------------------------------


def tree_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[str(path.relative_to(folder))] = digest.hexdigest()
    return hashes


def all_paths(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*")] if root.exists() else []


def task_processes() -> dict[str, int]:
    """``{task instance id: PID}`` of every Airflow task process on this machine.

    A task process titles itself ``airflow worker -- <task instance id>`` (the task SDK); the
    LocalExecutor worker that supervises it carries ``LocalExecutor:`` in its title instead.
    Only ids of our own runs are ever acted on, so other instances' tasks are safe.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("airflow worker -- ") and "LocalExecutor" not in title:
            found[title.rsplit(" ", 1)[-1]] = int(entry)
    return found


class Nemesis(threading.Thread):
    """Injects the scheduled faults into one campaign and records each one.

    Each fault is due at its time and none waits for another: a component is killed at once;
    a daemon outage runs in a thread of its own (two outages of one daemon take turns); a
    ``kill_task`` fault is armed from its time on and SIGKILLs the process of the next running
    task instance of its target (``push`` or ``pull`` of any facility, ``aggregate``,
    ``finalize``) once that task has run ``delay_s``. A fault that found nothing to hit before
    the campaign ended is recorded as missed.
    """

    def __init__(self, *, airflow: AirflowInstance, dag_id: str, facilities: dict[str, Facility],
                 faults: list[Fault], started: float, done: threading.Event):  # fmt: skip
        super().__init__(name="nemesis", daemon=True)
        self.airflow, self.dag_id, self.facilities = airflow, dag_id, facilities
        self.faults, self.started, self.done = faults, started, done
        self.record: list[dict] = []
        self.seen_pids: set[int] = set()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._daemon_locks = {(kind, name): threading.Lock() for kind in ("sshd_outage", "slurmctld_restart")
                              for name in facilities}  # fmt: skip
        self._outages: list[threading.Thread] = []
        self._names: dict[
            str, str | None
        ] = {}  # task instance id -> "task_id@run_id#try" (None: not ours)
        self._first_seen: dict[str, float] = {}
        self._killed: set[str] = set()

    def now(self) -> float:
        return time.monotonic() - self.started

    def _note(self, entry: dict) -> None:
        with self._lock:
            self.record.append(entry)
        log.info("fault: %s", json.dumps(entry))

    def run(self) -> None:
        try:
            pending = list(self.faults)
            armed: list[Fault] = []
            while not self.done.is_set():
                while pending and pending[0].at_s <= self.now():
                    fault = pending.pop(0)
                    if fault.kind == "kill_task":
                        armed.append(fault)
                    elif fault.kind in ("sshd_outage", "slurmctld_restart"):
                        thread = threading.Thread(target=self._outage, args=(fault,), daemon=True)
                        thread.start()
                        self._outages.append(thread)
                    else:
                        self._note(self._kill_component(fault))
                if armed:
                    armed = self._kill_tasks(armed)
                time.sleep(0.05 if armed else 0.1)
            for thread in self._outages:  # a stopped daemon is started again before we return
                thread.join()
            for fault in armed + pending:
                self._note(
                    {
                        **fault.to_dict(),
                        "t": None,
                        "outcome": "missed: nothing to hit before the campaign ended",
                    }
                )
        except BaseException as error:  # reported by the main thread
            self.error = error

    def _kill_component(self, fault: Fault) -> dict:
        entry = {**fault.to_dict(), "t": round(self.now(), 1)}
        pid = self.airflow.pids().get(fault.target)
        if pid is None or not alive(pid):
            return {**entry, "outcome": "missed: not running"}
        self.seen_pids.update(self.airflow.all_pids())  # its workers outlive it: ended at the end
        os.kill(pid, signal.SIGKILL)
        return {**entry, "outcome": "killed", "pid": pid}

    def _outage(self, fault: Fault) -> None:
        facility = self.facilities[fault.target]
        stop, start = (
            (facility.stop_sshd, facility.start_sshd) if fault.kind == "sshd_outage"
            else (facility.stop_slurmctld, facility.start_slurmctld)
        )  # fmt: skip
        with self._daemon_locks[(fault.kind, fault.target)]:
            at = self.now()
            try:
                stop()
                time.sleep(fault.duration_s)
            finally:
                start()
        self._note({**fault.to_dict(), "t": round(at, 1), "outcome": "stopped and started",
                    "down_s": round(self.now() - at, 1)})  # fmt: skip

    def _kill_tasks(self, armed: list[Fault]) -> list[Fault]:
        """Kills what the armed faults can hit now; returns those still armed."""
        processes = task_processes()
        now = time.monotonic()
        for ti_id in processes:
            self._first_seen.setdefault(ti_id, now)
        unknown = [ti for ti in processes if ti not in self._names]
        if unknown:
            self._names.update(dict.fromkeys(unknown))
            for run in self.airflow.dag_runs(self.dag_id):
                if run["state"] == "running":
                    for ti in self.airflow.task_instances(self.dag_id, run["dag_run_id"]):
                        if ti["id"] in self._names:
                            self._names[ti["id"]] = (
                                f"{ti['task_id']}@{run['dag_run_id']}#{ti['try_number']}"
                            )
        still = []
        for fault in armed:
            hit = None
            for ti_id, pid in processes.items():
                name = self._names.get(ti_id)
                task_id = name.split("@")[0] if name else ""
                if (
                    name and ti_id not in self._killed
                    and (task_id == fault.target or task_id.endswith(f".{fault.target}"))
                    and time.monotonic() - self._first_seen[ti_id] >= fault.delay_s and alive(pid)
                ):  # fmt: skip
                    hit = (ti_id, pid, name)
                    break
            if hit is None:
                still.append(fault)
                continue
            ti_id, pid, name = hit
            os.kill(pid, signal.SIGKILL)
            self._killed.add(ti_id)
            self._note(
                {
                    **fault.to_dict(),
                    "t": round(self.now(), 1),
                    "outcome": "killed",
                    "pid": pid,
                    "task": name,
                }
            )
        return still


def run_campaign(airflow: AirflowInstance, config: Path, campaign: str, storage: Path, *, timeout: float,
                 on_start: Callable[[str], None] | None = None) -> tuple[list[dict], float]:  # fmt: skip
    """Starts a campaign and follows it, restarting exited Airflow components; (runs, seconds)."""
    started = time.monotonic()
    dag_id = start_campaign(airflow, config, campaign, timeout=300)
    if on_start:
        on_start(dag_id)
    runs = wait_for_campaign(
        airflow, dag_id, campaign, storage / campaign, timeout=timeout, supervise=True
    )
    return runs, time.monotonic() - started


def final_digest(storage: Path, campaign: str, rounds: int) -> str | None:
    folder = storage / campaign / f"round-{rounds - 1:04d}" / "global"
    return model_digest(tree_hashes(folder)) if folder.is_dir() else None


def slurm_jobs(facilities: list[Facility], campaign: str) -> dict[str, dict[int, list[str]]]:
    """Each facility's job ids per round of ``campaign``, from its own completion log."""
    return {
        f.name: jobs_per_round(
            parse_jobcomp((Path(f.facility_dir) / "log" / "jobcomp.txt").read_text()), campaign
        )
        for f in facilities
    }


def verify(campaign_dir: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "xffl_tasks.verify", str(campaign_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    return result.returncode, (result.stdout + result.stderr).strip()[-2000:]


def tries(airflow: AirflowInstance, dag_id: str, runs: list[dict]) -> dict[str, int]:
    """Task instances that needed more than one try: ``{"task@round": tries}``."""
    extra = {}
    for run in runs:
        for ti in airflow.task_instances(dag_id, run["dag_run_id"]):
            if ti["try_number"] > 1:
                extra[f"{ti['task_id']}@{run['dag_run_id'].rsplit('-', 1)[1]}"] = ti["try_number"]
    return extra


def end_strays(pids: set[int]) -> None:
    """SIGKILLs processes we started that outlived their parent (a killed component's workers)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = f.read().startswith(b"airflow")
        except OSError:
            continue
        if ours and alive(pid):
            os.kill(pid, signal.SIGKILL)


def chaos_run(
    *,
    seed: int,
    counts: dict[str, int],
    rounds: int = 3,
    work: Path,
    python: str,
    training: dict | None = None,
    timeout: float = 1800,
    horizon_share: float = 0.7,
) -> dict:
    """Calm campaign, then the chaos campaign; the outcome as a JSON-safe dict (``ok``, ``problems``).

    The faults are drawn over the first ``horizon_share`` of the calm campaign's duration (a
    chaos campaign is usually slower, but a machine under less load can make it faster).
    """
    tiny = make_tiny(work / "tiny")
    testbed = Testbed.up(len(NAMES), names=list(NAMES), python=python)
    airflow = None
    seen_pids: set[int] = set()
    try:
        facilities = testbed.facilities
        corpora = {"italian": facilities[0], "czech": facilities[1]}
        entries = [
            LocalFacility(f, place_private_data(f, tiny / "data" / corpus, corpus))
            for corpus, f in corpora.items()
        ]
        dags = work / "dags"
        dags.mkdir(parents=True, exist_ok=True)
        airflow = AirflowInstance(
            work / "airflow", dags_folder=dags,
            env={**testbed.airflow_env(), "XFFL_FACILITY_PYTHON": python}, parallelism=8,
        )  # fmt: skip
        airflow.migrate()
        airflow.start(timeout=300)
        configs = {}
        for campaign in ("calm", "chaos"):
            configs[campaign] = write_config(
                work / f"{campaign}.yaml", campaign=campaign, storage=work / f"storage-{campaign}",
                base_model=tiny / "model", facilities=entries, python=python,
                training=training or TRAINING, convergence={"max_rounds": rounds}, retry=RETRY,
            )  # fmt: skip

        log.info("calm campaign")
        calm_runs, calm_s = run_campaign(
            airflow, configs["calm"], "calm", work / "storage-calm", timeout=timeout
        )
        calm_digest = final_digest(work / "storage-calm", "calm", rounds)
        if [r["state"] for r in calm_runs] != ["success"] * rounds:
            raise RuntimeError(
                f"the calm campaign failed: {[r['state'] for r in calm_runs]}; logs in {airflow.home}/logs"
            )

        faults = fault_schedule(
            seed, counts, horizon_s=horizon_share * calm_s, facilities=[f.name for f in facilities]
        )
        log.info("chaos campaign: %d faults over %.0f s", len(faults), horizon_share * calm_s)
        done = threading.Event()
        holder: dict = {}

        def unleash(dag_id: str) -> None:
            holder["nemesis"] = Nemesis(
                airflow=airflow, dag_id=dag_id, facilities={f.name: f for f in facilities},
                faults=faults, started=time.monotonic(), done=done,
            )  # fmt: skip
            seen_pids.update(airflow.all_pids())
            holder["nemesis"].start()

        try:
            chaos_runs, chaos_s = run_campaign(
                airflow,
                configs["chaos"],
                "chaos",
                work / "storage-chaos",
                timeout=timeout,
                on_start=unleash,
            )
        finally:
            done.set()
            if "nemesis" in holder:
                holder["nemesis"].join(timeout=300)
            seen_pids.update(airflow.all_pids())
            if "nemesis" in holder:
                seen_pids.update(holder["nemesis"].seen_pids)
        nemesis: Nemesis = holder["nemesis"]
        if nemesis.error:
            raise RuntimeError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error
        # a daemon the nemesis stopped is up again (it starts what it stopped before it returns)
        chaos_digest = final_digest(work / "storage-chaos", "chaos", rounds)
        jobs = slurm_jobs(facilities, "chaos")
        partial = partial_paths(
            all_paths(work / "storage-chaos" / "chaos")
            + [p for f in facilities for p in all_paths(Path(f.workdir) / "chaos")]
        )
        verify_rc, verify_out = verify(work / "storage-chaos" / "chaos")
        problems = outcome_problems(
            rounds=rounds, run_states=[r["state"] for r in chaos_runs], calm_digest=calm_digest,
            chaos_digest=chaos_digest, jobs=jobs, partial=partial, verify_rc=verify_rc,
        )  # fmt: skip
        calm_jobs = slurm_jobs(facilities, "calm")
        injected = [
            f for f in nemesis.record if f.get("outcome", "").startswith(("killed", "stopped"))
        ]
        return {
            "benchmark": "chaos_campaign",
            "seed": seed,
            "rounds": rounds,
            "ok": not problems,
            "problems": problems,
            "faults_injected": {k: sum(1 for f in injected if f["kind"] == k) for k in FAULT_KINDS},
            "faults_missed": sum(
                1 for f in nemesis.record if f.get("outcome", "").startswith("missed")
            ),
            "faults": sorted(nemesis.record, key=lambda f: (f["t"] is None, f["t"] or 0)),
            "calm_s": round(calm_s, 1),
            "chaos_s": round(chaos_s, 1),
            "calm_sha256": calm_digest,
            "chaos_sha256": chaos_digest,
            "slurm_jobs": {name: {str(k): v for k, v in per.items()} for name, per in jobs.items()},
            "calm_slurm_jobs_per_round": {
                name: [len(v) for v in per.values()] for name, per in calm_jobs.items()
            },
            "retried_tasks": tries(airflow, "xffl_chaos", chaos_runs),
            "component_restarts": sum(
                1 for f in injected if f["kind"].startswith("kill_") and f["kind"] != "kill_task"
            ),
            "unfinished_files": partial,
            "verify": verify_out.splitlines()[-1] if verify_out else "",
        }
    finally:
        if airflow is not None:
            seen_pids.update(airflow.all_pids())
            airflow.stop()
            end_strays(seen_pids)
        testbed.down(purge=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=None, help="the fault schedule's seed (default: random)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--faults", default=",".join(f"{k}={n}" for k, n in DEFAULT_COUNTS.items()),
                        help="KIND=N,... (kinds: " + ", ".join(FAULT_KINDS) + ")")  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (Airflow logs, storage)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per campaign")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    work = Path(tempfile.mkdtemp(prefix="xffl-chaos.", dir="/tmp"))
    outcome: dict = {}
    try:
        outcome = chaos_run(
            seed=seed, counts=parse_counts(args.faults), rounds=args.rounds, work=work,
            python=facility_python(), timeout=args.timeout,
        )  # fmt: skip
    finally:
        # kept for a look at the Airflow logs when asked or when the promise was broken
        if args.keep or not outcome.get("ok"):
            print(f"work folder kept: {work}", file=sys.stderr)
            outcome["work"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(outcome), flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
