"""The campaign view's pure parts on literal manifests: the data shaping, the SVG charts, the
page, and where the view may read (campaign folders of the DAG, inside the configured storage)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from xffl_airflow.ui import campaigns
from xffl_airflow.ui.campaign_view import (
    facility_rows,
    loss_chart,
    render_page,
    round_summaries,
    timing_chart,
)

from xffl_tasks.manifest import verify_campaign, write_manifest

EXAMPLES = Path(__file__).resolve().parents[4] / "plugins" / "xffl_airflow" / "federation" / "examples"


def facility(loss_before, loss_after, samples, *, weight, status="ok", reason=None, job_id="11"):
    return {
        "status": status,
        "reason": reason,
        "conn_id": "facility_x",
        "weight": weight,
        "job": {"job_id": job_id, "state": "COMPLETED", "queue_wait_s": 2.0, "run_s": 30.5},
        "push": {"seconds": 1.25, "bytes_total": 5_000_000, "mbps": 4.0},
        "pull": {"seconds": 0.5, "bytes_total": 5_000_000, "mbps": 10.0},
        "metrics": {"val_loss_before": loss_before, "val_loss_after": loss_after, "num_samples": samples},
    }


def manifest(round_number: int, *, stop=False, dag_id="xffl_demo", campaign="demo", **extra):
    return {
        "campaign": campaign,
        "round": round_number,
        "dag_id": dag_id,
        "run_id": f"xffl__{campaign}__round-{round_number:04d}",
        "facilities": {
            "italy": facility(5.0 - round_number, 4.5 - round_number, 300, weight=0.75),
            "czechia": facility(6.0 - round_number, 5.0 - round_number, 100, weight=0.25, job_id="12"),
        },
        "participants": ["czechia", "italy"],
        "missing": {},
        "rejected": {},
        "aggregation": {"strategy": "fedavg", "seconds": 0.75, "global_update_norm": 1.5},
        "outputs": {},
        "weighted_val_loss": 5.25 - round_number,
        "weighted_val_loss_after": 4.625 - round_number,
        "decision": {"stop": stop, "reason": "max_rounds reached" if stop else "go on", "improvement": None},
        **extra,
    }


def test_facility_rows_add_weights_rates_and_reasons_to_the_report_rows():
    left_out = manifest(1, stop=True)
    left_out["facilities"]["czechia"] = {"status": "missing", "reason": None, "weight": None, "job": None,
                                         "push": None, "pull": None, "metrics": None}  # fmt: skip
    left_out["missing"] = {"czechia": "czechia.train failed after 3 attempt(s)"}
    rows = facility_rows([manifest(0), left_out])
    assert [(r["round"], r["facility"]) for r in rows] == [
        (0, "czechia"), (0, "italy"), (0, "(global)"), (1, "czechia"), (1, "italy"), (1, "(global)"),
    ]  # fmt: skip
    italy = rows[1]
    assert (italy["loss_before"], italy["loss_after"], italy["samples"], italy["weight"]) == (5.0, 4.5, 300, 0.75)
    assert (italy["queue_s"], italy["run_s"], italy["push_s"], italy["pull_s"]) == (2.0, 30.5, 1.25, 0.5)
    assert (italy["push_mbps"], italy["pull_mbps"], italy["job"]) == (4.0, 10.0, "11")
    total = rows[2]
    assert (total["aggregation_s"], total["pull_s"], total["samples"], total["loss_before"]) == (0.75, None, 400, 5.25)
    assert rows[3]["status"] == "missing" and rows[3]["reason"] == "czechia.train failed after 3 attempt(s)"
    assert rows[3]["loss_before"] is None and rows[3]["push_mbps"] is None


def test_round_summaries_carry_the_decision_and_who_was_left_out():
    last = manifest(1, stop=True, missing={"gone": "cannot reach facility_gone"}, rejected={"odd": "rejected by the aggregation: norm"})
    first, second = round_summaries([manifest(0), last])
    assert (first["stop"], first["reason"], first["left_out"]) == (False, "go on", {})
    assert second["stop"] and second["reason"] == "max_rounds reached"
    assert second["left_out"] == {"gone": "cannot reach facility_gone", "odd": "rejected by the aggregation: norm"}
    assert (second["loss_before"], second["aggregation_s"], second["strategy"]) == (4.25, 0.75, "fedavg")


def test_the_loss_chart_draws_one_line_per_facility_and_the_weighted_one():
    svg = loss_chart(facility_rows([manifest(0), manifest(1), manifest(2, stop=True)]))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    series = dict(re.findall(r'data-series="([^"]+)" points="([^"]+)"', svg))
    assert set(series) == {"italy", "czechia", "(global)"}
    assert all(len(points.split()) == 3 for points in series.values())
    # italy's loss falls round by round: drawn lower each time (SVG's y grows downwards)
    italy_y = [float(p.split(",")[1]) for p in series["italy"].split()]
    assert italy_y[0] < italy_y[1] < italy_y[2]


def test_the_timing_chart_stacks_the_slowest_facility_and_the_aggregation():
    svg = timing_chart(facility_rows([manifest(0), manifest(1)]))
    bars = re.findall(r'data-round="(\d+)" data-part="(\w+)"', svg)
    assert sorted(set(p for _, p in bars)) == ["aggregation", "pull", "push", "queue", "training"]
    assert {r for r, _ in bars} == {"0", "1"}
    assert "round 0 training: 30.50 s" in svg and "round 1 aggregation: 0.75 s" in svg


def test_charts_of_nothing_say_so_and_bad_numbers_are_not_drawn():
    assert "nothing recorded yet" in loss_chart([]) and "nothing recorded yet" in timing_chart([])
    odd = manifest(0)
    odd["facilities"]["italy"]["metrics"]["val_loss_before"] = float("nan")
    odd["weighted_val_loss"] = "7"
    svg = loss_chart(facility_rows([odd]))
    assert re.findall(r'data-series="([^"]+)"', svg) == ["czechia"]


def test_the_page_shows_every_round_and_facility_and_escapes_what_facilities_report():
    hostile = manifest(1, stop=True)
    hostile["missing"] = {"czechia": "<script>alert(1)</script>"}
    hostile["facilities"]["czechia"]["status"] = "missing"
    page = render_page(dag_id="xffl_demo", campaign="demo", manifests=[manifest(0), hostile], problems=[],
                       highlight_round=1, campaigns=[("demo", "/a"), ("demo-2", "/b")])  # fmt: skip
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'id="verification" class="verification ok">OK manifest chain: 2 round(s) verified' in page
    assert page.count('<tr data-round="1" data-facility=') == 3 and 'class="highlight"' in page
    assert '<td data-col="loss_before">4.0000</td>' in page and '<td data-col="push_mbps">4.0</td>' in page
    assert "finished after round 1: max_rounds reached" in page and 'href="/b"' in page
    assert page.count("<svg") == 2


def test_the_page_names_the_failing_link():
    problems = ["round-0001/manifest.json: previous_manifest_sha256 abc does not match round-0000/manifest.json"]
    page = render_page(dag_id="d", campaign="c", manifests=[manifest(0)], problems=problems, files_link="/x?files=1")
    assert "FAIL manifest chain: 1 problem(s)" in page and "round-0001/manifest.json: previous_manifest_sha256" in page
    assert 'id="verify-files" href="/x?files=1"' in page


# -- where the view may read ---------------------------------------------------------------


def write_campaign(storage: Path, name: str, rounds: int, *, dag_id: str = "xffl_demo") -> Path:
    folder = storage / name
    previous = None
    for number in range(rounds):
        round_dir = folder / f"round-{number:04d}"
        round_dir.mkdir(parents=True)
        previous = write_manifest(round_dir, manifest(number, stop=number == rounds - 1, dag_id=dag_id, campaign=name), previous)
    return folder


@pytest.fixture
def demo_dag(tmp_path, monkeypatch) -> campaigns.FederationDag:
    storage = tmp_path / "storage"
    storage.mkdir()
    for name in ("XFFL_BASE_MODEL", "XFFL_ITALY_WORKDIR", "XFFL_ITALY_DATA", "XFFL_CZECHIA_WORKDIR", "XFFL_CZECHIA_DATA"):
        monkeypatch.setenv(name, f"/x/{name.lower()}")
    monkeypatch.setenv("XFFL_FACILITY_PYTHON", "/opt/venv/bin/python")
    monkeypatch.setenv("XFFL_STORAGE", str(storage))
    monkeypatch.setenv("XFFL_FEDERATION_CONFIG", f"{EXAMPLES / 'local.yaml'}:{tmp_path / 'missing.yaml'}")
    return campaigns.federation_dag("xffl_demo")


def test_known_dags_come_from_the_configs_and_a_broken_config_is_left_out(demo_dag, tmp_path):
    assert (demo_dag.dag_id, demo_dag.campaign, demo_dag.storage) == ("xffl_demo", "demo", tmp_path / "storage")
    assert list(campaigns.known_dags()) == ["xffl_demo"]
    with pytest.raises(campaigns.NotFound, match="not a federation DAG"):
        campaigns.federation_dag("xffl_other")
    assert campaigns.known_dags({}) == {}


def test_campaign_folders_are_found_by_name_run_and_dag(demo_dag):
    storage = demo_dag.storage
    write_campaign(storage, "demo", 2)
    write_campaign(storage, "demo-rerun", 1)
    write_campaign(storage, "theirs", 1, dag_id="xffl_theirs")
    (storage / "demo-empty").mkdir()  # no manifest yet, and not the config's own campaign
    assert sorted(campaigns.campaigns_of(demo_dag)) == ["demo", "demo-rerun"]
    assert campaigns.default_campaign(demo_dag) == "demo"
    assert campaigns.campaign_of_run(demo_dag, "xffl__demo-rerun__round-0000") == ("demo-rerun", 0)
    assert campaigns.campaign_dir(demo_dag, "demo") == (storage / "demo").resolve()
    assert len(campaigns.read_manifests(storage / "demo")) == 2
    with pytest.raises(campaigns.NotFound):
        campaigns.campaign_of_run(demo_dag, "manual__2025-01-01")


@pytest.mark.parametrize("name", ["../demo", "/etc", "..", "Demo", "demo/round-0000", "", "a" * 65, "demo\n"])
def test_names_that_are_not_campaign_names_are_refused(demo_dag, name):
    write_campaign(demo_dag.storage, "demo", 1)
    with pytest.raises(campaigns.NotFound):
        campaigns.campaign_dir(demo_dag, name)


def test_folders_outside_the_storage_or_of_another_dag_are_refused(demo_dag, tmp_path):
    outside = write_campaign(tmp_path / "elsewhere", "stolen", 1)
    os.symlink(outside, demo_dag.storage / "linked")
    write_campaign(demo_dag.storage, "theirs", 1, dag_id="xffl_theirs")
    for name in ("linked", "theirs", "nothing"):
        with pytest.raises(campaigns.NotFound):
            campaigns.campaign_dir(demo_dag, name)


def test_the_view_verifies_with_the_same_code_as_the_command(demo_dag):
    folder = write_campaign(demo_dag.storage, "demo", 3)
    assert verify_campaign(folder, check_files=False) == []
    older = folder / "round-0000" / "manifest.json"
    data = bytearray(older.read_bytes())
    data[10] ^= 0x20
    older.write_bytes(bytes(data))
    problems = verify_campaign(folder, check_files=False)
    page = render_page(dag_id="xffl_demo", campaign="demo", manifests=campaigns.read_manifests(folder), problems=problems)
    assert "FAIL manifest chain" in page and "round-0001/manifest.json" in page
    # an unreadable manifest is left out of the tables, and the verification names it
    (folder / "round-0002" / "manifest.json").write_text("{not json")
    assert [m["round"] for m in campaigns.read_manifests(folder)] == [0, 1]
    assert json.dumps(verify_campaign(folder, check_files=False)).count("round-0002") >= 1


def test_a_warm_started_campaign_shows_where_it_came_from():
    from xffl_airflow.ui.campaign_view import lineage_line

    source = {"campaign": "sched-20260101t0000", "round": 1, "finished": True, "manifest_sha256": "ab" * 32}
    line = lineage_line([{"round": 0, "warm_start": source}], [("sched-20260101t0000", "/xffl/dags/d/campaigns/x")])
    assert 'id="lineage"' in line and "warm-started from" in line and "round 1" in line
    assert '<a href="/xffl/dags/d/campaigns/x">sched-20260101t0000</a>' in line
    assert lineage_line([{"round": 0}]) == ""
    hostile = lineage_line([{"round": 0, "warm_start": {**source, "campaign": "<script>", "finished": False}}])
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile and "unfinished" in hostile
