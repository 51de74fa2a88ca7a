"""``python -m xffl_tasks.aggregate`` run for real, in the facility environment (no Airflow).

Starts one child process per test (the CLI) and waits for it. The argument parsers are also
tested on literal inputs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import facility_python
from xffl_tasks.aggregate.__main__ import parse_options, parse_weights
from xffl_tasks.aggregate.errors import AggregationError

REPO = Path(__file__).resolve().parents[3]


def test_cli_aggregates_with_names_weights_and_options(family, tmp_path):
    out = tmp_path / "global"
    command = [
        facility_python(),
        "-m",
        "xffl_tasks.aggregate",
        "--previous",
        str(family.base),
        "--out",
        str(out),
        "--strategy",
        "fedavgm",
        "--option",
        "momentum=0.5",
        "--option",
        "server_learning_rate=0.9",
        "--weights",
        "1,2,3",
        "--names",
        "it,cz,de",
        *[str(p) for p in family.clients.values()],
    ]
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert (
        len(lines) == 1 and "fedavgm of 3 clients written to" in lines[0] and str(out) in lines[0]
    )
    report = json.loads((out / "aggregation.json").read_text())
    assert report["options"] == {"server_learning_rate": 0.9, "momentum": 0.5}
    # each weight stays with its name; the clients are aggregated and reported in name order
    assert [(c["name"], c["weight"], c["weight_source"]) for c in report["clients"]] == [
        ("cz", 2.0, "given"),
        ("de", 3.0, "given"),
        ("it", 1.0, "given"),
    ]
    assert [c["normalized_weight"] for c in report["clients"]] == pytest.approx(
        [2 / 6, 3 / 6, 1 / 6]
    )
    assert (out / "server_state" / "momentum.safetensors").is_file()


def test_parse_weights_and_options():
    assert parse_weights("3, 1.5,2") == [3.0, 1.5, 2.0]
    assert parse_options(["tau=1e-3", " beta1 = 0.8"]) == {"tau": 0.001, "beta1": 0.8}
    assert parse_options([]) == {}
    for bad, words in [
        (lambda: parse_weights("1,,2"), "value 2"),
        (lambda: parse_options(["tau"]), "KEY=VALUE"),
        (lambda: parse_options(["=3"]), "KEY=VALUE"),
        (lambda: parse_options(["tau=1", "tau=2"]), "twice"),
        (lambda: parse_options(["tau=x"]), "'tau'"),
    ]:
        with pytest.raises(AggregationError, match=words):
            bad()


def test_usage_errors_are_one_line(capsys):
    from xffl_tasks.aggregate.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--previous", "p", "client"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--out" in lines[0]
