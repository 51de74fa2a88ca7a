"""``make demo``: a real 3-round federated campaign on the embedded default.

Brings up two local Slurm facilities behind sshd (``italy`` and ``czechia``), makes the tiny
LLaMA model and an Italian and a Czech corpus offline and places each corpus at its facility,
starts Airflow (SQLite, LocalExecutor: api-server, scheduler, dag-processor, triggerer on
localhost), triggers round 0 of the campaign described by the packaged example config
(``plugins/xffl_airflow/federation/examples/local.yaml``), follows the rounds as they chain,
prints the per-round table, where the plot and manifests are, and the UI address and login,
then tears everything down. ``XFFL_DEMO_KEEP=1`` (``make demo KEEP=1``) keeps it running for a
look in the UI until Ctrl-C.

SIGINT and SIGTERM stop it through the same teardown (Airflow, then the facilities), however
it was started: a demo started in the background without a terminal inherits SIGINT ignored,
and ``make`` passes neither signal on, so the demo installs its own handlers (a signal during
the teardown is noted, never obeyed half-way).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from xffl_testbed.airflow_instance import AirflowInstance
from xffl_testbed.campaign import (
    campaign_runs,
    make_tiny,
    place_private_data,
    wait_for_campaign,
    wait_for_release,
)
from xffl_testbed.facilities import Testbed, facility_python

REPO = Path(__file__).resolve().parent.parent
# XFFL_DEMO_LORA=1 (make demo LORA=1): the LoRA campaign of examples/local-lora.yaml instead;
# XFFL_DEMO_PRIVACY=1 (make demo PRIVACY=1): the DP-SGD campaign of examples/local-dp.yaml
LORA = os.environ.get("XFFL_DEMO_LORA", "") not in ("", "0", "false")
PRIVACY = os.environ.get("XFFL_DEMO_PRIVACY", "") not in ("", "0", "false")
CAMPAIGN = "demo_lora" if LORA else ("demo_dp" if PRIVACY else "demo")
EXAMPLE = REPO / "plugins" / "xffl_airflow" / "federation" / "examples" / (
    "local-lora.yaml" if LORA else ("local-dp.yaml" if PRIVACY else "local.yaml"))
DAG_ID = f"xffl_{CAMPAIGN}"


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class DemoStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the demo tears down and exits 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame) -> None:
    raise DemoStopped(signum)


def _already_stopping(signum: int, _frame) -> None:
    say(f"{signal.Signals(signum).name}: already tearing down, please wait")


def stop_on_signals(handler=_stop) -> None:
    """SIGINT and SIGTERM call ``handler``, even where SIGINT was inherited ignored (a
    background job); the processes the demo starts then get both signals' defaults back."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def main() -> int:
    stop_on_signals()
    started = time.monotonic()
    work = Path(os.environ.get("XFFL_DEMO_DIR", REPO / ".demo")).resolve()
    keep = os.environ.get("XFFL_DEMO_KEEP", "") not in ("", "0", "false")
    python = facility_python()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    say(f"working folder {work}")
    say("making the tiny LLaMA model and the Italian and Czech corpora (offline)")
    tiny = make_tiny(work / "tiny")
    say("bringing up two local Slurm facilities behind sshd: italy, czechia")
    testbed = Testbed.up(2, names=["italy", "czechia"], python=python)
    airflow = None
    status = 1
    try:
        env = {
            **testbed.airflow_env(),
            "XFFL_FEDERATION_CONFIG": str(EXAMPLE),
            "XFFL_STORAGE": str(work / "campaigns"),
            "XFFL_BASE_MODEL": str(tiny / "model"),
            "XFFL_FACILITY_PYTHON": python,
        }
        for facility, corpus in zip(testbed.facilities, ("italian", "czech")):
            env[f"XFFL_{facility.name.upper()}_WORKDIR"] = facility.workdir
            env[f"XFFL_{facility.name.upper()}_DATA"] = place_private_data(facility, tiny / "data" / corpus, corpus)
            say(f"{facility.name}: {corpus} corpus placed at the facility only ({env[f'XFFL_{facility.name.upper()}_DATA']})")
        os.environ.update(env)  # the config's ${...} references, for this process's own checks
        airflow = AirflowInstance(work / "airflow", dags_folder=REPO / "dags", env=env, parallelism=8)
        say("starting Airflow (SQLite, LocalExecutor): migrating the database")
        airflow.migrate()
        airflow.start()
        say(f"Airflow is up at {airflow.base_url} (login {airflow.username} / {airflow.password})")
        airflow.wait_for_dag(DAG_ID, timeout=180)
        run_id = airflow.trigger(DAG_ID, run_id=f"xffl__{CAMPAIGN}__round-0000", conf={"round": 0})
        say(f"triggered {run_id}; each round: push -> train (Slurm, deferred) -> pull -> aggregate")
        seen: dict[str, str] = {}

        def progress(runs: list[dict]) -> None:
            for run in runs:
                if seen.get(run["dag_run_id"]) != run["state"]:
                    seen[run["dag_run_id"]] = run["state"]
                    say(f"{run['dag_run_id']}: {run['state']}")

        campaign_dir = work / "campaigns" / CAMPAIGN
        runs = wait_for_campaign(airflow, DAG_ID, CAMPAIGN, campaign_dir, timeout=1800, on_poll=progress)
        if runs[-1]["state"] != "success":
            say(f"round run {runs[-1]['dag_run_id']} failed; its task logs are under {airflow.home / 'logs'}")
            return 1
        print()
        print((campaign_dir / "report.txt").read_text())
        verify = subprocess.run(
            [sys.executable, "-m", "xffl_tasks.verify", str(campaign_dir)], capture_output=True, text=True
        )
        say(verify.stdout.strip() or verify.stderr.strip())
        say(f"{len(campaign_runs(airflow, DAG_ID, CAMPAIGN))} rounds; plot: {campaign_dir / 'report.png'}")
        say(f"manifests: {campaign_dir}/round-*/manifest.json; global models: {campaign_dir}/round-*/global/")
        say(f"UI: {airflow.base_url} (login {airflow.username} / {airflow.password}), DAG {DAG_ID}")
        say(f"campaign view: {airflow.base_url}/dags/{DAG_ID}/plugin/xffl-campaign (the DAG's Campaign tab)")
        status = 0 if verify.returncode == 0 else 1
        status = max(status, show_release(airflow, work / "campaigns"))
        if keep:
            say("XFFL_DEMO_KEEP is set: Airflow and the facilities keep running; Ctrl-C or SIGTERM stops them")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt as stop:  # DemoStopped: SIGINT or SIGTERM
                say(f"{stop}: stopping")
    finally:
        stop_on_signals(_already_stopping)
        say("tearing down: Airflow, then the facilities (every process by PID)")
        if airflow is not None:
            airflow.stop()
        testbed.down(purge=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    return status


def show_release(airflow: AirflowInstance, storage: Path) -> int:
    """Waits for the campaign's release run; prints the release's folder and its card's first
    lines (or why nothing was released); 0 when the run succeeded and the release verifies."""
    from xffl_tasks.manifest import read_manifest

    say("the campaign ended: its release run evaluates the last global model at both facilities")
    run = wait_for_release(airflow, CAMPAIGN, CAMPAIGN, timeout=900)
    decision = read_manifest(storage / CAMPAIGN / "release" / "selection.json") or {}
    if run["state"] != "success":
        say(f"release run {run['dag_run_id']} failed; its task logs are under {airflow.home / 'logs'}")
        return 1
    releases = sorted((storage / "_releases" / CAMPAIGN).glob("[0-9]*"), key=lambda p: int(p.name))
    if not decision.get("release") or not releases:
        say(f"nothing released: {decision.get('reason')}")
        return 0
    folder = releases[-1]
    say(f"released: {folder} ({decision.get('reason')})")
    card = (folder / "README.md").read_text().splitlines()
    print("\n".join(card[:12]) + "\n...")
    check = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(folder)], capture_output=True, text=True)
    say(check.stdout.strip() or check.stderr.strip())
    return check.returncode


def run() -> int:
    """``main()``, with a stop by signal as exit status 128 + its number (SIGTERM: 143)."""
    try:
        return main()
    except DemoStopped as stopped:  # a signal before or during the campaign: torn down already
        say(f"{stopped}: stopped")
        return 128 + stopped.signum


if __name__ == "__main__":
    sys.exit(run())
