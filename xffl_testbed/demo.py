"""``make demo``: a real 3-round federated campaign on the embedded default.

Brings up two local Slurm facilities behind sshd (``italy`` and ``czechia``), makes the tiny
LLaMA model and an Italian and a Czech corpus offline and places each corpus at its facility,
starts Airflow (SQLite, LocalExecutor: api-server, scheduler, dag-processor, triggerer on
localhost), triggers round 0 of the campaign described by the packaged example config
(``plugins/xffl_airflow/federation/examples/local.yaml``), follows the rounds as they chain,
prints the per-round table, where the plot and manifests are, and the UI address and login,
then tears everything down. ``XFFL_DEMO_KEEP=1`` (``make demo KEEP=1``) keeps it running for a
look in the UI until Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from xffl_testbed.airflow_instance import AirflowInstance
from xffl_testbed.campaign import campaign_runs, make_tiny, place_private_data, wait_for_campaign
from xffl_testbed.facilities import Testbed, facility_python

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "plugins" / "xffl_airflow" / "federation" / "examples" / "local.yaml"
DAG_ID = "xffl_demo"
CAMPAIGN = "demo"


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
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
        if keep:
            say("XFFL_DEMO_KEEP is set: Airflow and the facilities keep running; Ctrl-C stops them")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        say("tearing down: Airflow, then the facilities (every process by PID)")
        if airflow is not None:
            airflow.stop()
        testbed.down(purge=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
