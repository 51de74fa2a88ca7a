"""The round's aggregation takes the sha256 that the pulls verified instead of hashing the
pulled models again: each input is read exactly once. A pulled file touched after its pull is
hashed again, and the report says so.

Starts: the session's ``testbed`` (two facilities behind sshd, Slurm) and ``airflow_instance``
(api-server, scheduler, dag-processor, triggerer on SQLite), stopped at the end of the session
by PID. A one-round campaign runs in Airflow; then, to touch a pulled file between the pull and
the aggregation, this test runs the round's aggregation step again in its own process, from
the round's sealed plan and the pulls' records in the campaign's storage (what the DAG's tasks
obey; their XComs are only shown).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import run_campaign
from xffl_testbed.campaign import wait_for_campaign

pytestmark = pytest.mark.slow


def sizes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def test_the_aggregation_reads_each_pulled_file_once_and_rehashes_a_touched_one(
    airflow_instance, testbed, corpora, tiny, storage
):
    from xffl_airflow.federation.names import FederationDag
    from xffl_airflow.federation.rounds.aggregate import aggregate_step, delivered
    from xffl_airflow.federation.rounds.store import load_plan

    dag_id = run_campaign(
        airflow_instance, testbed, corpora, tiny, storage, campaign="given-hashes",
        convergence={"max_rounds": 1},
    )  # fmt: skip
    runs = wait_for_campaign(
        airflow_instance, dag_id, "given-hashes", storage / "given-hashes", timeout=900
    )
    assert [r["state"] for r in runs] == ["success"], runs
    dag = FederationDag(dag_id, "given-hashes", storage, str(storage / "given-hashes.yaml"))
    sealed = load_plan(dag, "given-hashes", 0)
    pulled = delivered(sealed)
    assert sorted(pulled) == ["site1", "site2"]
    previous = Path(sealed.plan.input_model)
    clients = {name: sealed.layout.client_dir(0, name) for name in pulled}
    for name, result in pulled.items():  # the pull recorded what the aggregation checks
        assert set(result["transfer"]["file_stats"]) == set(result["transfer"]["files"]), name

    # in Airflow: every hash of the clients given by the pulls, every input read once
    global_model = storage / "given-hashes" / "round-0000" / "global"
    report = json.loads((global_model / "aggregation.json").read_text())
    weights = sum(sizes(folder, "*.safetensors") for folder in clients.values())
    assert report["bytes_read"] == sizes(previous) + weights
    for entry in report["clients"]:
        assert set(entry["hash_sources"].values()) == {"given"}, entry
        assert entry["files"] == pulled[entry["name"]]["transfer"]["files"]
    assert report["input_hashes"]["stale"] == []

    # a pulled file touched after the pull: hashed again, and the report says so
    touched = sorted(clients["site2"].glob("*.safetensors"))[0]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    # what an attempt killed while aggregating leaves behind: removed by the next one
    round_dir = storage / "given-hashes" / "round-0000"
    (round_dir / ".global.partial-x1y2z3w4").mkdir()
    (round_dir / ".global.partial-x1y2z3w4" / "model.safetensors").write_bytes(b"half")
    (round_dir / "global.stale-1").mkdir()
    again = aggregate_step(sealed)["report"]
    assert sorted(p.name for p in round_dir.iterdir() if "global" in p.name) == ["global"]
    assert again["input_hashes"]["stale"] == [str(touched)]
    site2 = next(entry for entry in again["clients"] if entry["name"] == "site2")
    assert site2["hash_sources"][touched.name] == "computed"
    assert site2["files"][touched.name] == pulled["site2"]["transfer"]["files"][touched.name]
    once = sizes(previous) + weights  # plus a pass of its own if it is read out of order
    assert once <= again["bytes_read"] <= once + touched.stat().st_size
    assert again["output_files"] == report["output_files"]
