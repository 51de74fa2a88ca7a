"""The campaign report: a table from the manifests, and a PNG plot."""

from __future__ import annotations

import json

from xffl_airflow.federation.report import campaign_rows, render_table, write_report

from xffl_tasks.manifest import write_manifest


def manifest(round_number, losses):
    return {
        "campaign": "demo",
        "round": round_number,
        "facilities": {
            name: {
                "status": "ok",
                "job": {"job_id": str(10 + round_number), "queue_wait_s": 0.5, "run_s": 20.0},
                "push": {"seconds": 0.25},
                "pull": {"seconds": 0.5},
                "metrics": {"val_loss_before": before, "val_loss_after": before - 1, "num_samples": 100},
            }
            for name, before in losses.items()
        },
        "aggregation": {"seconds": 1.5, "global_update_norm": 0.1},
        "weighted_val_loss": sum(losses.values()) / len(losses),
        "weighted_val_loss_after": sum(losses.values()) / len(losses) - 1,
        "decision": {"stop": round_number == 1},
    }


def test_rows_table_and_plot(tmp_path):
    campaign = tmp_path / "demo"
    previous = None
    for number, losses in enumerate([{"italy": 6.0, "czechia": 7.0}, {"italy": 4.0, "czechia": 5.0}]):
        folder = campaign / f"round-{number:04d}"
        folder.mkdir(parents=True)
        previous = write_manifest(folder, manifest(number, losses), previous)
    from xffl_airflow.federation.report import load_manifests

    rows = campaign_rows(load_manifests(campaign))
    assert [(r["round"], r["facility"]) for r in rows] == [
        (0, "czechia"), (0, "italy"), (0, "(global)"), (1, "czechia"), (1, "italy"), (1, "(global)")
    ]
    assert rows[2]["loss_before"] == 6.5 and rows[5]["status"] == "stop" and rows[5]["samples"] == 200
    # the aggregation's seconds have a column of their own, not the global row's "pull s"
    assert (rows[2]["aggregation_s"], rows[2]["pull_s"]) == (1.5, None)
    assert (rows[0]["aggregation_s"], rows[0]["pull_s"]) == (None, 0.5)
    table = render_table(rows)
    assert "loss before" in table.splitlines()[0]
    import re

    titles = re.split(r"\s{2,}", table.splitlines()[0].strip())
    global_row = dict(zip(titles, re.split(r"\s{2,}", next(line for line in table.splitlines() if "(global)" in line).strip()), strict=True))
    assert (global_row["pull s"], global_row["agg s"]) == ("-", "1.50")
    assert "4.0000" in table and "(global)" in table
    text, txt, png = write_report(campaign)
    assert text == table and txt.read_text().strip() == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_table_alone_and_the_command_line(tmp_path, capsys):
    from xffl_airflow.federation.report import main

    campaign = tmp_path / "demo"
    folder = campaign / "round-0000"
    folder.mkdir(parents=True)
    write_manifest(folder, manifest(0, {"italy": 6.0}), None)
    text, txt, png = write_report(campaign, draw=False)
    assert png is None and not (campaign / "report.png").exists() and "italy" in text
    assert main([str(campaign)]) == 0
    assert (campaign / "report.png").is_file() and "loss before" in capsys.readouterr().out


def test_neither_the_table_nor_the_plot_fails_on_extreme_stored_values(tmp_path):
    from xffl_airflow.federation.report import write_report
    from xffl_airflow.ui.campaign_view import render_page

    from xffl_tasks.manifest import write_manifest

    folder = tmp_path / "c" / "round-0000"
    folder.mkdir(parents=True)
    manifest = {"campaign": "c", "round": 0, "weighted_val_loss": 1e308, "decision": {"stop": True},
                "facilities": {"f1": {"status": "ok", "metrics": {"val_loss_before": -1e308, "num_samples": 10**30}}}}
    write_manifest(folder, manifest, None)
    table, _, png = write_report(tmp_path / "c")
    assert png.is_file() and "1e+308" not in table
    page = render_page(dag_id="d", campaign="c", manifests=[json.loads((folder / "manifest.json").read_text())],
                       problems=[])  # fmt: skip
    assert 'data-round="0"' in page
