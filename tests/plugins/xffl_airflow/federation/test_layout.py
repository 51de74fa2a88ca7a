"""Campaign paths and run ids."""

from __future__ import annotations

from pathlib import Path

from xffl_airflow.federation.layout import CampaignLayout, RemoteLayout, parse_run_id, run_id


def test_run_ids_round_trip():
    assert run_id("demo-20261125t1900", 3) == "xffl__demo-20261125t1900__round-0003"
    assert parse_run_id(run_id("demo", 12)) == ("demo", 12)
    assert parse_run_id("manual__2026-11-25T19:00:00") is None


def test_local_and_remote_layout():
    layout = CampaignLayout(Path("/srv"), "demo")
    assert layout.global_model(2) == Path("/srv/demo/round-0002/global")
    assert layout.client_dir(0, "italy") == Path("/srv/demo/round-0000/clients/italy")
    assert layout.manifest(1) == Path("/srv/demo/round-0001/manifest.json")
    remote = RemoteLayout("demo", 7)
    assert (remote.global_dir, remote.local_dir, remote.jobs_dir) == (
        "demo/round-0007/global", "demo/round-0007/local", "demo/round-0007/jobs"
    )


def test_the_pushed_view_leaves_out_the_aggregation_report_and_server_state(tmp_path):
    from xffl_airflow.federation.rounds import model_view

    model = tmp_path / "global"
    (model / "server_state").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "aggregation.json", "server_state/momentum.safetensors"):
        (model / name).write_text(name)
    view = model_view(model, tmp_path / "input")
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
    assert (view / "model.safetensors").read_text() == "model.safetensors"
    model_view(model, view)  # a retry makes it again
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
