"""Every file in dags/ loads with no import errors."""

from __future__ import annotations

from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_every_dag_file_imports_without_errors(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    files_with_dags = {Path(dag.fileloc).name for dag in bag.dags.values()}
    python_files = {p.name for p in DAGS.glob("*.py") if not p.name.startswith("_")}
    assert python_files <= files_with_dags, f"files without a DAG: {python_files - files_with_dags}"
