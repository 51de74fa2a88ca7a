"""Helpers of the end-to-end campaign tests (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from xffl_testbed.campaign import LocalFacility, start_campaign, write_config

TRAINING = {"max_steps": 30, "learning_rate": 0.003, "threads": 1, "seed": 0}


def ti_states(airflow, dag_id: str, run_id: str) -> dict[str, dict]:
    return {ti["task_id"]: ti for ti in airflow.task_instances(dag_id, run_id)}


def running_jobs(facility) -> list[tuple[str, int]]:
    """(job name, seconds running) of the facility's RUNNING jobs, from squeue."""
    out = facility.ssh("squeue -h -t RUNNING -o '%j|%M'", check=False).stdout
    jobs = []
    for line in out.split():
        name, elapsed = line.split("|")
        seconds = 0
        for part in elapsed.replace("-", ":").split(":"):
            seconds = seconds * 60 + int(part)
        jobs.append((name, seconds))
    return jobs


def run_campaign(airflow, testbed, corpora, tiny: Path, storage: Path, *, campaign: str, **config_kwargs) -> str:
    """Writes a config for the session's two facilities, starts round 0; returns the DAG id."""
    site1, site2 = testbed.facilities
    settings = {
        "facilities": [LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
        "training": TRAINING,
        **config_kwargs,
    }
    config = write_config(
        storage / f"{campaign}.yaml", campaign=campaign, storage=storage, base_model=tiny / "model",
        python=site1.python, **settings,
    )  # fmt: skip
    return start_campaign(airflow, config, campaign)
