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
    assert set(bag.dags) == {"xffl_demo", "xffl_demo.release", "xffl_llama2_7b_it_cs", "xffl_llama2_7b_it_cs.release"}
    release = bag.dags["xffl_llama2_7b_it_cs.release"]
    assert {"prepare_release", "centre_a.push", "centre_a.evaluate", "centre_b.pull", "select", "released", "approve",
            "publish"} <= set(release.task_ids)  # fmt: skip
    assert {"campaign_ended", "start_release"} <= set(bag.dags["xffl_llama2_7b_it_cs"].task_ids)
    hpc = bag.dags["xffl_llama2_7b_it_cs"]
    assert {"prepare", "centre_a.push", "centre_a.train", "centre_b.pull", "aggregate", "finalize", "next_round"} <= set(
        hpc.task_ids
    )
    assert hpc.max_active_runs == 1
    assert hpc.task_dict["centre_a.train"].retries == 3


def test_two_configs_that_would_make_one_dag_id_are_refused_naming_both(tmp_path, monkeypatch):
    import yaml
    from xffl_airflow.federation.config import ConfigError
    from xffl_airflow.federation.dag import build_federation_dags

    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_ITALY", json.dumps({"conn_type": "ssh", "host": "h", "login": "x"}))
    paths = []
    for campaign in ("it-cs", "it_cs"):
        path = tmp_path / f"{campaign}.yaml"
        path.write_text(yaml.safe_dump({"campaign": campaign, "storage": "/srv/xffl", "base_model": "/srv/m",
                                        "facilities": [{"name": "italy", "workdir": "/w", "data": "/d"}]}))  # fmt: skip
        paths.append(str(path))
    import pytest

    with pytest.raises(ConfigError, match=f"{paths[1]}: campaign makes DAG xffl_it_cs, as {paths[0]} does"):
        build_federation_dags(paths)
