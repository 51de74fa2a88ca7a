"""A chaos campaign at a small size: a 3-round campaign under one fault of each kind (two task
kills) ends as its calm twin did: same final global model, one Slurm job per facility and
round, a manifest chain that verifies, no unfinished file.

Starts (through ``benchmarks/chaos_campaign.py``'s ``chaos_run``): two local facilities of its
own (``chaosa``, ``chaosb``: slurmctld, slurmd and sshd each, one munged) and an Airflow of its
own (api-server, scheduler, dag-processor, triggerer on SQLite); everything is stopped by PID
when it ends, the Airflow workers orphaned by a killed scheduler included. The faults kill and
stop only processes it started.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.conftest import facility_python

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("starts_facilities", "starts_airflow")]

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos_campaign.py"
COUNTS = {"kill_scheduler": 1, "kill_triggerer": 1, "kill_dag_processor": 1, "kill_task": 2,
          "sshd_outage": 1, "slurmctld_restart": 1}  # fmt: skip
# shorter training than the benchmark's: the test's two campaigns fit in a few minutes
TRAINING = {
    "max_steps": 5,
    "learning_rate": 0.003,
    "threads": 1,
    "seed": 0,
    "batch_size": 8,
    "seq_len": 64,
}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("chaos_campaign", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_campaign_under_faults_ends_as_its_calm_twin(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail(
            "the local facilities need root (useradd, Slurm daemons); run `make test` as root"
        )
    chaos = load_benchmark()
    work = tmp_path_factory.mktemp("chaos")
    outcome = chaos.chaos_run(
        seed=26,
        counts=COUNTS,
        rounds=3,
        work=work,
        python=facility_python(),
        training=TRAINING,
        horizon_share=0.6,
        timeout=600,
    )
    print(json.dumps(outcome))
    assert outcome["problems"] == [], json.dumps(outcome, indent=1)
    assert outcome["ok"]
    assert outcome["calm_sha256"] == outcome["chaos_sha256"] and len(outcome["calm_sha256"]) == 64
    # the faults happened: at least the component kills and the daemon outages, always possible
    injected = outcome["faults_injected"]
    for kind in (
        "kill_scheduler",
        "kill_triggerer",
        "kill_dag_processor",
        "sshd_outage",
        "slurmctld_restart",
    ):
        assert injected[kind] == 1, outcome["faults"]
    # a task kill needs its task alive at the drawn moment: of the two drawn, at least one lands
    # (which one depends on the machine's speed; the benchmark's seeds hit each kind)
    assert injected["kill_task"] >= 1, outcome["faults"]
    assert all(len(per_round) == 3 for per_round in outcome["slurm_jobs"].values())
