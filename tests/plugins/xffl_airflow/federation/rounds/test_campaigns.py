"""Campaigns belong to their DAG: the first prepare claims the campaign (``campaign.json``, never
overwritten); a run of another DAG naming it is refused before anything is read or written;
campaigns from before owner records belong to the DAG their manifests record. Offline."""

from __future__ import annotations

import json

import pytest
from xffl_airflow.federation.errors import CampaignOwnedError
from xffl_airflow.federation.layout import CampaignLayout
from xffl_airflow.federation.rounds.campaigns import campaign_owner, claim_campaign

from tests.plugins.xffl_airflow.federation.rounds.round_support import dag_of, prepare, write_config
from xffl_tasks.manifest import write_manifest


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.lstat().st_mtime_ns) for p in folder.rglob("*"))


def test_a_run_of_another_dag_naming_a_campaign_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    first = prepare(monkeypatch, write_config(tmp_path, campaign="alpha"))
    campaign_dir = first.layout.campaign_dir
    assert json.loads((campaign_dir / "campaign.json").read_text())["dag_id"] == "xffl_alpha"
    before = tree(campaign_dir)
    other = write_config(tmp_path, campaign="beta")  # same storage
    with pytest.raises(CampaignOwnedError, match="campaign alpha in .* belongs to DAG xffl_alpha, not xffl_beta"):
        prepare(monkeypatch, other, campaign="alpha")
    with pytest.raises(CampaignOwnedError):
        prepare(monkeypatch, other, campaign="alpha", round_number=1)
    assert tree(campaign_dir) == before


def test_a_claim_is_made_once_and_never_overwritten(tmp_path):
    alpha, beta = dag_of(write_config(tmp_path, campaign="alpha")), dag_of(write_config(tmp_path, campaign="beta"))
    layout = CampaignLayout(alpha.storage, "shared")
    claim_campaign(alpha, layout, run="r1")
    claim_campaign(alpha, layout, run="r2")  # its own: fine, unchanged
    assert json.loads(layout.owner_record.read_text())["created_by_run"] == "r1"
    with pytest.raises(CampaignOwnedError):
        claim_campaign(beta, layout, run="r3")
    assert campaign_owner(layout.campaign_dir) == "xffl_alpha"
    assert [p.name for p in layout.campaign_dir.iterdir()] == ["campaign.json"]  # no temporaries left


def test_a_campaign_from_before_owner_records_belongs_to_the_dag_its_manifests_record(tmp_path, monkeypatch):
    config = write_config(tmp_path, campaign="beta")
    legacy = dag_of(config).storage / "legacy" / "round-0000"
    legacy.mkdir(parents=True)
    write_manifest(legacy, {"campaign": "legacy", "round": 0, "dag_id": "xffl_alpha"}, None)
    assert campaign_owner(legacy.parent) == "xffl_alpha"
    with pytest.raises(CampaignOwnedError, match="belongs to DAG xffl_alpha"):
        prepare(monkeypatch, config, campaign="legacy", round_number=1)
    assert not (legacy.parent / "campaign.json").exists()
