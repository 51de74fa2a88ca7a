"""Deterministic rounds: two campaigns with the same configuration but their names, run side by
side on the same facilities, produce byte-identical global models round after round (every
file of ``round-NNNN/global`` but ``aggregation.json``, the report, which holds paths and
seconds), and so do the models each facility trained.

Starts: the session's ``testbed`` (two facilities: Slurm behind sshd) and ``airflow_instance``
(api-server, scheduler, dag-processor, triggerer on SQLite), stopped at the end of the session
by PID; two federation DAG files in its dags folder, removed at the end (waiting until the
dag-processor reports no import error for them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, run_campaign
from xffl_testbed.campaign import wait_for_campaign

pytestmark = pytest.mark.slow

CAMPAIGNS = ("same-a", "same-b")
ROUNDS = 2
#: The report of the aggregation: where the inputs were and how long it took.
NOT_MODEL = {"aggregation.json"}


def model_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a model folder (server state included), but the report and
    the training's metrics.json (times)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in NOT_MODEL | {"metrics.json"}
    }


def test_two_campaigns_with_the_same_config_give_identical_global_models(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow = airflow_instance
    training = {**TRAINING, "max_steps": 4, "seq_len": 64, "batch_size": 8}
    dag_files = [Path(airflow.dags_folder) / f"xffl_federation_{name}.py" for name in CAMPAIGNS]
    try:
        dag_ids = []
        for name in CAMPAIGNS:  # both started before either is awaited: they run side by side
            dag_ids.append(
                run_campaign(
                    airflow,
                    testbed,
                    corpora,
                    tiny,
                    storage,
                    campaign=name,
                    training=training,
                    convergence={"max_rounds": ROUNDS},
                )
            )
        for dag_id, name in zip(dag_ids, CAMPAIGNS):
            runs = wait_for_campaign(airflow, dag_id, name, storage / name, timeout=900)
            assert [r["state"] for r in runs] == ["success"] * ROUNDS, runs

        first, second = (storage / name for name in CAMPAIGNS)
        previous = None
        for number in range(ROUNDS):
            round_dir = f"round-{number:04d}"
            for site in ("site1", "site2"):  # what each facility trained: the same bytes
                a = model_digests(first / round_dir / "clients" / site)
                assert "model.safetensors" in a, sorted(a)
                assert a == model_digests(second / round_dir / "clients" / site), (round_dir, site)
            digests = model_digests(first / round_dir / "global")
            assert "model.safetensors" in digests and "config.json" in digests, sorted(digests)
            assert digests == model_digests(second / round_dir / "global"), round_dir
            # the manifests record the same hashes for the model's files
            recorded = [
                json.loads((campaign / round_dir / "manifest.json").read_text())["outputs"]
                for campaign in (first, second)
            ]
            for outputs in recorded:
                kept = {k: v for k, v in outputs.items() if Path(k).name not in NOT_MODEL}
                assert kept == {f"global/{name}": h for name, h in digests.items()}
            # and the campaign moved: each round's model is a new one
            assert digests["model.safetensors"] != previous
            previous = digests["model.safetensors"]
    finally:
        # the later tests of this session expect a DAG folder without import errors
        for dag_file, name in zip(dag_files, CAMPAIGNS):
            airflow.remove_dag_file(dag_file, f"xffl_{name.replace('-', '_')}")
