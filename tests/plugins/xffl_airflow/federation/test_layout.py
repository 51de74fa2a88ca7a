"""Campaign paths, locally and at the facilities."""

from __future__ import annotations

from pathlib import Path

from xffl_airflow.federation.layout import CampaignLayout, RemoteLayout


def test_local_and_remote_layout():
    layout = CampaignLayout(Path("/srv"), "demo")
    assert layout.global_model(2) == Path("/srv/demo/round-0002/global")
    assert layout.client_dir(0, "italy") == Path("/srv/demo/round-0000/clients/italy")
    assert layout.manifest(1) == Path("/srv/demo/round-0001/manifest.json")
    assert layout.plan(1) == Path("/srv/demo/round-0001/plan.json")
    assert layout.owner_record == Path("/srv/demo/campaign.json")
    assert layout.step_record(1, "italy", "pull") == Path("/srv/demo/round-0001/steps/italy/pull.json")
    assert layout.aggregate_record(1) == Path("/srv/demo/round-0001/steps/aggregate.json")
    remote = RemoteLayout("demo", 7)
    assert (remote.global_dir, remote.local_dir, remote.jobs_dir) == (
        "demo/round-0007/global", "demo/round-0007/local", "demo/round-0007/jobs"
    )
    assert remote.base_dir == "demo/base"
    spaced = RemoteLayout("demo", 7, namespace="xffl_demo")
    assert (spaced.global_dir, spaced.base_dir) == ("xffl_demo/demo/round-0007/global", "xffl_demo/demo/base")
