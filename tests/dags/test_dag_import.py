"""Every file in dags/ loads with no import errors and builds its DAGs.

The federation DAG file builds one DAG per config named by XFFL_FEDERATION_CONFIG: here the
two example configs that ship with the package (the local one and the two-HPC-centre one).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
EXAMPLES = REPO / "plugins" / "xffl_airflow" / "federation" / "examples"


def test_every_dag_file_imports_and_builds_the_example_federations(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("XFFL_FEDERATION_CONFIG", f"{EXAMPLES / 'local.yaml'}:{EXAMPLES / 'hpc.yaml'}")
    for name in ("STORAGE", "BASE_MODEL", "ITALY_WORKDIR", "ITALY_DATA", "CZECHIA_WORKDIR", "CZECHIA_DATA"):
        monkeypatch.setenv(f"XFFL_{name}", f"/srv/xffl/{name.lower()}")
    monkeypatch.setenv("XFFL_FACILITY_PYTHON", "/opt/xffl/venv/bin/python")
    for facility in ("italy", "czechia", "centre_a", "centre_b"):  # building looks them up
        connection = {"conn_type": "ssh", "host": f"login.{facility}.example.org", "login": "xffl"}
        monkeypatch.setenv(f"AIRFLOW_CONN_FACILITY_{facility.upper()}", json.dumps(connection))
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    files_with_dags = {Path(dag.fileloc).name for dag in bag.dags.values()}
    python_files = {p.name for p in DAGS.glob("*.py") if not p.name.startswith("_")}
    assert python_files <= files_with_dags, f"files without a DAG: {python_files - files_with_dags}"
    assert set(bag.dags) == {"xffl_demo", "xffl_llama2_7b_it_cs"}
    hpc = bag.dags["xffl_llama2_7b_it_cs"]
    assert {"prepare", "centre_a.push", "centre_a.train", "centre_b.pull", "aggregate", "finalize", "next_round"} <= set(
        hpc.task_ids
    )
    assert hpc.max_active_runs == 1
    assert hpc.task_dict["centre_a.train"].retries == 3
