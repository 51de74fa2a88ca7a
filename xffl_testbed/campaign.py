"""Running a real federated campaign on the local test bed: shared by the demo, the end-to-end
tests and the round-overhead benchmark.

- ``make_tiny(dir)``: the tiny LLaMA model and the Italian and Czech corpora, made offline;
- ``place_private_data(facility, corpus)``: puts a corpus at a facility, owned by its user;
- ``write_config(...)``: a federation config for local facilities;
- ``wait_for_campaign(airflow, dag_id, campaign)``: follows the chain of round runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from xffl_testbed.airflow_instance import AirflowError, AirflowInstance
from xffl_testbed.facilities import Facility

DAG_FILE = Path(__file__).resolve().parent.parent / "dags" / "xffl_federation.py"
log = logging.getLogger(__name__)


def make_tiny(out: Path, *, seed: int = 0) -> Path:
    """Makes the tiny model and corpora with ``python -m xffl_tasks.tiny`` (once per folder)."""
    if not (out / "model" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "xffl_tasks.tiny", "--out", str(out), "--seed", str(seed)], check=True)
    return out


def place_private_data(facility: Facility, corpus: Path, name: str) -> str:
    """Copies a corpus into the facility user's home (the data lives at the facility only)."""
    target = Path(facility.home) / "data" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(corpus, target)
    subprocess.run(["chown", "-R", f"{facility.user}:{facility.user}", str(Path(facility.home) / "data")], check=True)
    return str(target)


@dataclass
class LocalFacility:
    """One facility entry of a local federation config."""

    facility: Facility
    data: str
    name: str | None = None
    conn_id: str | None = None
    preamble: list[str] = field(default_factory=list)
    workdir: str | None = None


def write_config(
    path: Path,
    *,
    campaign: str,
    storage: Path,
    base_model: Path,
    facilities: Sequence[LocalFacility],
    python: str,
    training: dict[str, Any] | None = None,
    convergence: dict[str, Any] | None = None,
    quorum: int | None = None,
    retry: dict[str, Any] | None = None,
    aggregation: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Writes a federation config for facilities of the local test bed."""
    config = {
        "campaign": campaign,
        "storage": str(storage),
        "base_model": str(base_model),
        "facilities": [
            {
                "name": entry.name or entry.facility.name,
                "conn_id": entry.conn_id or entry.facility.conn_id,
                "workdir": entry.workdir or entry.facility.workdir,
                "data": entry.data,
                "python": python,
                "preamble": entry.preamble,
                "sbatch": {"partition": entry.facility.partition, "cpus_per_task": 1, "time": "00:30:00"},
            }
            for entry in facilities
        ],
        "training": training or {"max_steps": 30, "threads": 1, "learning_rate": 0.003, "batch_size": 8, "seq_len": 64},
        "aggregation": aggregation or {"strategy": "fedavg"},
        "convergence": convergence or {"max_rounds": 3},
        "retry": retry or {"retries": 2, "retry_delay_s": 2, "max_retry_delay_s": 10, "train_timeout_h": 1},
        **extra,
    }
    if quorum is not None:
        config["quorum"] = quorum
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def install_federation_dag(dags_folder: Path, config: Path, *, name: str) -> Path:
    """A DAG file that builds the federation DAG of one config file (what dags/ does per env)."""
    path = Path(dags_folder) / f"xffl_federation_{name}.py"
    path.write_text(
        "from xffl_airflow.federation.dag import build_federation_dag\n\n"
        f"build_federation_dag({str(config)!r})\n"
    )
    return path


def start_campaign(airflow: AirflowInstance, config: Path, campaign: str, *, timeout: float = 180) -> str:
    """Installs the federation DAG of ``config``, waits for it, triggers round 0; the DAG id."""
    dag_file = install_federation_dag(airflow.dags_folder, config, name=campaign)
    dag_id = f"xffl_{campaign.replace('-', '_')}"
    airflow.wait_for_dag(dag_id, timeout=timeout, dag_file=dag_file)
    airflow.trigger(dag_id, run_id=f"xffl__{campaign}__round-0000", conf={"round": 0})
    return dag_id


def campaign_runs(airflow: AirflowInstance, dag_id: str, campaign: str) -> list[dict]:
    prefix = f"xffl__{campaign}__round-"
    return sorted((r for r in airflow.dag_runs(dag_id) if r["dag_run_id"].startswith(prefix)), key=lambda r: r["dag_run_id"])


def wait_for_campaign(
    airflow: AirflowInstance,
    dag_id: str,
    campaign: str,
    campaign_dir: Path,
    *,
    timeout: float = 1800,
    on_poll: Callable[[list[dict]], None] | None = None,
    poll: float = 1.0,
    supervise: bool = False,
) -> list[dict]:
    """Waits until the campaign's last round ended (its manifest says stop) or a round failed.

    Returns the round runs in order. ``on_poll`` sees the runs at every poll (for progress
    output or for sampling task states while jobs run). With ``supervise``, Airflow components
    that exited are started again and an API that does not answer is waited for, as a process
    supervisor would (for database outages).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervise:
            for component in airflow.restart_exited():
                log.warning("Airflow %s had exited; started it again", component)
        try:
            runs = campaign_runs(airflow, dag_id, campaign)
        except (AirflowError, httpx.HTTPError) as error:
            if not supervise:
                raise
            log.warning("Airflow API not answering (%s); waiting", str(error)[:200])
            time.sleep(poll)
            continue
        if on_poll:
            on_poll(runs)
        if runs:
            last = runs[-1]
            if last["state"] == "failed":
                return runs
            if last["state"] == "success":
                manifest = campaign_dir / f"round-{int(last['dag_run_id'].rsplit('-', 1)[1]):04d}" / "manifest.json"
                if manifest.is_file() and json.loads(manifest.read_text())["decision"]["stop"]:
                    return runs
        time.sleep(poll)
    raise AirflowError(f"campaign {campaign} of {dag_id} did not end within {timeout:.0f} s")


def wait_for_release(airflow: AirflowInstance, config_campaign: str, campaign: str, *, timeout: float = 900,
                     poll: float = 1.0) -> dict:  # fmt: skip
    """Waits for the release run of an ended ``campaign`` (started by its last round) to end;
    returns the run (its ``state``: success, also when nothing was released, or failed)."""
    from xffl_airflow.federation.names import release_dag_id, release_run_id

    dag_id, run_id = release_dag_id(config_campaign), release_run_id(campaign)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run = airflow.dag_run(dag_id, run_id)
        except AirflowError as error:
            if " 404 " not in str(error):
                raise
        else:
            if run["state"] in ("success", "failed"):
                return run
        time.sleep(poll)
    raise AirflowError(f"release run {run_id} of {dag_id} did not end within {timeout:.0f} s")


def answer_release_approval(airflow: AirflowInstance, config_campaign: str, campaign: str, option: str, *,
                            timeout: float = 900, poll: float = 1.0, user: str | None = None) -> dict:  # fmt: skip
    """Waits until the release run of ``campaign`` asks for a person's approval, then answers
    ``option`` ("Approve" or "Reject") through the REST API's human-in-the-loop endpoint, as
    ``user`` (default: the admin); returns the form as it was asked (subject, body, options)."""
    from xffl_airflow.federation.names import release_dag_id, release_run_id

    path = (f"dags/{release_dag_id(config_campaign)}/dagRuns/{release_run_id(campaign)}"
            "/taskInstances/approve/-1/hitlDetails")  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            asked = airflow.api("GET", path, user=user)
        except AirflowError as error:
            if " 404 " not in str(error):
                raise
        else:
            if asked.get("response_received"):
                raise AirflowError(f"the approval of {campaign} was already answered: {asked.get('chosen_options')}")
            airflow.api("PATCH", path, user=user, json={"chosen_options": [option], "params_input": {}})
            return asked
        time.sleep(poll)
    raise AirflowError(f"the release run of {campaign} asked for no approval within {timeout:.0f} s")
