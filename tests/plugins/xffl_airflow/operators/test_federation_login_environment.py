"""The federation DAG hands each facility's login environment (config author's, fixed when the
DAG is built) to its SlurmOperator. Unit level: connections from ``AIRFLOW_CONN_*``."""

from __future__ import annotations

import json

import yaml
from xffl_airflow.federation.dag import build_federation_dag

CONFIG = {
    "campaign": "login_env",
    "storage": "/srv/xffl",
    "base_model": "/srv/models/tiny",
    "facilities": [
        {"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data",
         "login_preamble": ["module load slurm", "export SLURM_TIME_FORMAT=standard"],
         "slurm_bin": "/opt/slurm/23.02/bin"},
        {"name": "czechia", "workdir": "/home/b/xffl", "data": "/home/b/data"},
    ],
}  # fmt: skip


def test_each_train_task_gets_its_facilitys_login_environment(tmp_path, monkeypatch):
    for name in ("italy", "czechia"):
        monkeypatch.setenv(f"AIRFLOW_CONN_FACILITY_{name.upper()}",
                           json.dumps({"conn_type": "ssh", "host": "login.example.org"}))  # fmt: skip
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    dag = build_federation_dag(str(path))
    italy, czechia = dag.task_dict["italy.train"], dag.task_dict["czechia.train"]
    assert italy.login_preamble == ["module load slurm", "export SLURM_TIME_FORMAT=standard"]
    assert italy.slurm_bin == "/opt/slurm/23.02/bin"
    assert (czechia.login_preamble, czechia.slurm_bin) == ([], None)
    assert "login_preamble" not in italy.template_fields  # never a run's to change
