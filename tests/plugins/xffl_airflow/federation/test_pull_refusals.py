"""``pull_local`` refuses a facility's hostile outputs at once; the refusal reads as a rejection.

The transfer is replaced by a local copy of a tiny safetensors model folder; starts no process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import xffl_airflow.transfer as transfer
from airflow.sdk.exceptions import AirflowFailException
from safetensors.torch import save_file
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.rounds import _missing_reason, pull_local, record_failure


class _Report:
    def to_dict(self):
        return {"seconds": 0.1, "files": {}}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    model = tmp_path / "input"
    model.mkdir()
    save_file({"w": torch.zeros(4)}, model / "model.safetensors")
    trained = tmp_path / "trained"
    trained.mkdir()
    save_file({"w": torch.ones(4)}, trained / "model.safetensors")
    plan = {
        "storage": str(tmp_path / "storage"), "campaign": "c", "round": 0, "input_model": str(model),
        "facilities": {"f1": {"conn_id": "facility_f1", "workdir": "/w", "remote_local": "/w/out"}},
    }  # fmt: skip

    def fake_pull(remote, remote_path, target):
        shutil.copytree(trained, target)
        return _Report()

    monkeypatch.setattr(transfer, "pull", fake_pull)
    return plan, trained


def test_valid_outputs_travel_on_as_checked_metrics_only(setup):
    plan, trained = setup
    (trained / "metrics.json").write_text(
        json.dumps({"num_samples": 8, "val_loss_before": 2, "junk": "x" * 999})
    )
    result = pull_local(plan, "f1")
    assert result["metrics"] == {"num_samples": 8, "val_loss_before": 2.0}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (
            '{"num_samples": 8, "val_loss_before": "abc"}',
            "metrics.json val_loss_before 'abc' is not a number",
        ),
        ('{"num_samples": 1' + "0" * 300 + "}", "metrics.json num_samples 1000"),
        (
            '{"num_samples": 8, "x": ' + "[" * 200 + "]" * 200 + "}",
            "metrics.json nests deeper than 4 levels",
        ),
        (
            '{"num_samples": 8, "device": "' + "x" * 70000 + '"}',
            "metrics.json is larger than 65536 bytes",
        ),
    ],
)
def test_hostile_metrics_fail_the_pull_at_once_and_the_folder_is_set_aside(setup, metrics, message):
    plan, trained = setup
    (trained / "metrics.json").write_text(metrics)
    with pytest.raises(AirflowFailException) as raised:
        pull_local(plan, "f1")
    assert str(raised.value).startswith(f"outputs refused: client 'f1': {message}")
    target = CampaignLayout(Path(plan["storage"]), "c").client_dir(0, "f1")
    assert not target.exists() and target.with_name("f1.rejected").is_dir()
    record_failure(plan, "f1", "f1.pull", 1, raised.value)
    assert _missing_reason(plan, "f1").startswith(
        f"rejected: outputs refused: client 'f1': {message}"
    )


def test_a_model_of_another_shape_fails_the_pull(setup):
    plan, trained = setup
    save_file({"w": torch.ones(5)}, trained / "model.safetensors")
    (trained / "metrics.json").write_text('{"num_samples": 8}')
    with pytest.raises(AirflowFailException, match=r"client 'f1': tensor 'w' has shape \[5\]"):
        pull_local(plan, "f1")
