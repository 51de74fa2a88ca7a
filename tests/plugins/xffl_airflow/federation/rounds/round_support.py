"""Offline rounds for the tests of the round's steps: a tiny safetensors model, a config file, a
round prepared and sealed in a tmp_path storage, and fake transfers (local copies) in place of
SFTP. Starts no process; connections are not looked up."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from xffl_airflow.federation.config import load_config
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.rounds.prepare import prepare_round
from xffl_airflow.federation.rounds.store import SealedPlan

FACILITIES = ("f1", "f2")


def model_folder(folder: Path, tensors: Mapping[str, torch.Tensor], metrics: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def write_config(tmp_path: Path, *, campaign: str = "offline", facilities=FACILITIES, **extra: Any) -> Path:
    base = model_folder(tmp_path / "base", {"w": torch.zeros(4)})
    data = {
        "campaign": campaign, "storage": str(tmp_path / "storage"), "base_model": str(base),
        "facilities": [{"name": name, "workdir": f"/home/{name}/xffl", "data": f"/home/{name}/data"}
                       for name in facilities],
        **extra,
    }  # fmt: skip
    path = tmp_path / f"{campaign}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def dag_of(config_path: Path) -> FederationDag:
    return FederationDag.of(load_config(config_path), str(config_path))


def prepare(monkeypatch, config_path: Path, *, round_number: int = 0, campaign: str | None = None,
            dag: FederationDag | None = None, **conf: Any) -> SealedPlan:  # fmt: skip
    """Round ``round_number`` prepared as the DAG's prepare task would (connections not checked)."""
    monkeypatch.setattr("xffl_airflow.federation.rounds.prepare.check_connections", lambda config: None)
    dag = dag or dag_of(config_path)
    run_conf = {"round": round_number, **({"campaign": campaign} if campaign else {}), **conf}
    return prepare_round(dag=dag, dag_facilities=[f.name for f in load_config(config_path).facilities],
                         run_conf=run_conf, run_type="manual", run=f"manual__{round_number}")  # fmt: skip


class FakeReport:
    def __init__(self, files: dict[str, str], seconds: float = 0.1):
        self.files, self.seconds = files, seconds

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "files": dict(self.files), "bytes_total": 0, "bytes_sent": 0,
                "bytes_skipped": 0, "files_skipped": 0, "mbps": 0.0, "retries": 0, "file_stats": {}}  # fmt: skip


def fake_transfers(monkeypatch, trained: Mapping[str, Path]) -> dict[str, list]:
    """``push`` hashes what it would send; ``pull`` copies ``trained[facility]`` into place."""
    import xffl_airflow.transfer as transfer
    from xffl_airflow.federation.rounds.prepare import view_hashes

    calls: dict[str, list] = {"push": [], "pull": []}

    def push(local, remote, remote_dir, **tuning):
        calls["push"].append((remote.name, str(local), remote_dir))
        return FakeReport(view_hashes(Path(local)))

    def pull(remote, remote_dir, local, **tuning):
        calls["pull"].append((remote.name, remote_dir, str(local)))
        if Path(local).exists():
            shutil.rmtree(local)
        shutil.copytree(trained[remote.name], local)
        return FakeReport({p.name: "0" * 64 for p in Path(local).iterdir()})

    monkeypatch.setattr(transfer, "push", push)
    monkeypatch.setattr(transfer, "pull", pull)
    return calls
