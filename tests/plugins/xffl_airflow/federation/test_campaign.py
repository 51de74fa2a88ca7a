"""End-to-end federated campaigns under a real scheduler and triggerer, on the real local
facilities (Slurm behind sshd), with the tiny LLaMA model and the Italian and Czech corpora.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance`` (api-server,
scheduler, dag-processor, triggerer on SQLite), stopped at the end of the session by PID. The
PostgreSQL variant (``test_campaign_postgres.py``) reuses the helpers below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import (
    TRAINING,
    run_campaign,
    running_jobs,
    ti_states,
)
from tests.plugins.xffl_airflow.hooks.slurm_support import wait_until
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import (
    LocalFacility,
    install_federation_dag,
    wait_for_campaign,
    write_config,
)

pytestmark = pytest.mark.slow

FAIL_ONCE = (
    'if [ -e "$HOME/fail-once" ]; then rm -f "$HOME/fail-once"; '
    'echo "injected failure of the first training attempt" >&2; exit 3; fi'
)


def test_three_round_campaign_chains_converges_and_verifies(airflow_instance, testbed, corpora, tiny, storage):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    # the first training attempt at site1 fails: Airflow must retry it and go on
    marker = Path(site1.home) / "fail-once"
    marker.write_text("x")
    subprocess.run(["chown", f"{site1.user}:{site1.user}", str(marker)], check=True)
    dag_id = run_campaign(
        airflow, testbed, corpora, tiny, storage, campaign="e2e",
        facilities=[LocalFacility(site1, corpora[site1.name], preamble=[FAIL_ONCE]), LocalFacility(site2, corpora[site2.name])],
        convergence={"max_rounds": 3},
    )  # fmt: skip
    samples = {"deferred": 0, "not_deferred": []}

    def check_deferred(runs):
        """While a Slurm training job runs (5 s in), its training task must be deferred."""
        if not runs or runs[-1]["state"] != "running":
            return
        run_id = runs[-1]["dag_run_id"]
        for facility in (site1, site2):
            for name, seconds in running_jobs(facility):
                if seconds >= 5 and name.startswith("xffl"):
                    state = ti_states(airflow, dag_id, run_id)[f"{facility.name}.train"]["state"]
                    if state == "deferred":
                        samples["deferred"] += 1
                    elif running_jobs(facility):  # the job still runs: not a race with its end
                        samples["not_deferred"].append((run_id, facility.name, state, seconds))

    runs = wait_for_campaign(airflow, dag_id, "e2e", storage / "e2e", timeout=1500, on_poll=check_deferred)
    assert [r["dag_run_id"] for r in runs] == [f"xffl__e2e__round-{n:04d}" for n in range(3)]
    assert [r["state"] for r in runs] == ["success"] * 3, runs
    assert samples["deferred"] > 0, "never saw a training task while its Slurm job ran"
    assert samples["not_deferred"] == [], samples["not_deferred"]

    manifests = [json.loads((storage / "e2e" / f"round-{n:04d}" / "manifest.json").read_text()) for n in range(3)]
    assert manifests[-1]["decision"]["stop"] is True and "max_rounds" in manifests[-1]["decision"]["reason"]
    assert all(not m["decision"]["stop"] for m in manifests[:-1])
    losses = [m["weighted_val_loss"] for m in manifests]
    assert losses[-1] < losses[0], losses
    for manifest in manifests:
        assert manifest["participants"] == ["site1", "site2"]
        for name in ("site1", "site2"):
            facility = manifest["facilities"][name]
            assert facility["job"]["state"] == "COMPLETED" and facility["metrics"]["num_samples"] > 0
        assert manifest["outputs"] and all(len(h) == 64 for h in manifest["outputs"].values())
    # the injected failure: one retry of site1's first training, and the round went on
    first = ti_states(airflow, dag_id, "xffl__e2e__round-0000")
    assert first["site1.train"]["try_number"] == 2 and first["site2.train"]["try_number"] == 1
    log = airflow.task_log(dag_id, "xffl__e2e__round-0000", "site1.train", try_number=1)
    assert "SlurmJobFailed" in log and "exit code 3:0" in log and "injected failure" in log, log[-3000:]

    assert (storage / "e2e" / "report.png").stat().st_size > 5000
    verify = [sys.executable, "-m", "xffl_tasks.verify", str(storage / "e2e")]
    assert subprocess.run(verify, capture_output=True, text=True).returncode == 0
    older = storage / "e2e" / "round-0000" / "manifest.json"
    data = bytearray(older.read_bytes())
    data[10] ^= 0x20
    older.write_bytes(bytes(data))
    broken = subprocess.run(verify, capture_output=True, text=True)
    assert broken.returncode == 1 and "round-0001/manifest.json" in broken.stderr


def test_a_facility_down_for_good_is_left_out_when_the_quorum_allows(airflow_instance, testbed, corpora, tiny, storage):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    # a registered facility whose host no longer answers (nothing listens on its port)
    airflow.api(
        "POST",
        "connections",
        json={
            "connection_id": "facility_gone",
            "conn_type": "ssh",
            "host": "127.0.0.1",
            "port": 9,
            "login": site2.user,
            "extra": json.dumps({"key_file": site2.client_key, "host_key": site2.host_key, "conn_timeout": 3}),
        },
    )
    gone = LocalFacility(site2, corpora[site2.name], name="gone", conn_id="facility_gone")
    # and one whose private data is not where the config says: training refuses its input
    # (exit status 2), so the task fails at once instead of queueing its retries
    nodata = LocalFacility(site2, f"{site2.home}/no-such-corpus", name="nodata")
    dag_id = run_campaign(
        airflow, testbed, corpora, tiny, storage, campaign="quorum",
        facilities=[LocalFacility(site1, corpora[site1.name]), gone, nodata],
        quorum=1, convergence={"max_rounds": 1},
        retry={"retries": 1, "retry_delay_s": 1, "max_retry_delay_s": 2, "train_timeout_h": 1},
    )  # fmt: skip
    runs = wait_for_campaign(airflow, dag_id, "quorum", storage / "quorum", timeout=900)
    assert [r["state"] for r in runs] == ["success"]
    manifest = json.loads((storage / "quorum" / "round-0000" / "manifest.json").read_text())
    assert manifest["participants"] == ["site1"]
    assert "gone" in manifest["missing"] and "cannot reach" in manifest["missing"]["gone"]
    assert manifest["facilities"]["gone"]["status"] == "missing"
    states = ti_states(airflow, dag_id, runs[0]["dag_run_id"])
    assert states["gone.push"]["state"] == "failed" and states["gone.push"]["try_number"] == 2
    assert states["gone.train"]["state"] == "upstream_failed"
    assert states["nodata.train"]["state"] == "failed" and states["nodata.train"]["try_number"] == 1
    assert states["nodata.pull"]["state"] == "upstream_failed"
    reason = manifest["missing"]["nodata"]
    assert "nodata.train failed after 1 attempt(s)" in reason and "no-such-corpus" in reason
    assert "refused its input" in reason


def test_a_missing_connection_is_refused_by_the_dag_and_an_unusable_one_by_the_round(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow = airflow_instance
    site1, _ = testbed.facilities
    nowhere = LocalFacility(site1, corpora[site1.name], name="nowhere", conn_id="facility_nowhere")
    config = write_config(
        storage / "noconn.yaml", campaign="noconn", storage=storage, base_model=tiny / "model",
        python=site1.python, training=TRAINING, facilities=[LocalFacility(site1, corpora[site1.name]), nowhere],
    )  # fmt: skip
    dag_id, run_id = "xffl_noconn", "xffl__noconn__round-0000"
    dag_file = install_federation_dag(airflow.dags_folder, config, name="noconn")
    try:
        # Parsing refuses the DAG, naming the config, the field and the connection: no run can start.
        (error,) = wait_until(lambda: airflow.import_errors(dag_file), timeout=120, every=1, what="import error")
        assert str(config) in error and "facilities[1].conn_id (nowhere)" in error and "facility_nowhere" in error
        assert "facilities[0]" not in error  # site1's connection exists
        with pytest.raises(AirflowError, match=" 404 "):
            airflow.trigger(dag_id, run_id=run_id, conf={"round": 0})

        # Added, but with no host key to check against: the next parse builds the DAG; the round
        # refuses the connection (prepare retries first: the API may have been away) and no
        # facility work starts.
        extra = {"key_file": site1.client_key, "known_hosts": str(storage / "no-known-hosts")}
        airflow.api("POST", "connections", json={"connection_id": "facility_nowhere", **site1.connection, "extra": json.dumps(extra)})
        wait_until(lambda: not airflow.import_errors(dag_file), timeout=120, every=1, what="import error cleared")
        airflow.wait_for_dag(dag_id)
        airflow.trigger(dag_id, run_id=run_id, conf={"round": 0})
        assert airflow.wait_for_run(dag_id, run_id, timeout=600) == "failed"
        states = ti_states(airflow, dag_id, run_id)
        assert states["prepare"]["state"] == "failed"
        assert states["prepare"]["try_number"] == 4  # retried: the connection may be mended meanwhile
        assert {states[f"{n}.push"]["state"] for n in ("site1", "nowhere")} == {"upstream_failed"}
        log = airflow.task_log(dag_id, run_id, "prepare", try_number=states["prepare"]["try_number"])
        assert "facilities[1].conn_id (nowhere)" in log and "host key cannot be checked" in log
        assert not (storage / "noconn" / "round-0000" / "clients").exists()
    finally:
        # the later tests of this session expect a DAG folder without import errors
        airflow.remove_dag_file(dag_file, dag_id)
        try:
            airflow.api("DELETE", "connections/facility_nowhere")
        except AirflowError:
            pass  # never added


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad;Name"}, "facilities[0].name"),
        ({"strategy": "fedmagic"}, "aggregation.strategy: unknown strategy 'fedmagic'"),
    ],
)
def test_the_dag_refuses_a_bad_config_naming_the_field(airflow_db, tmp_path, change, field):
    """A config that does not validate is an import error of the DAG file: no run can start."""
    from airflow.dag_processing.dagbag import DagBag

    config = {
        "campaign": "bad",
        "storage": str(tmp_path / "s"),
        "base_model": str(tmp_path / "m"),
        "facilities": [{"name": change.get("name", "ok"), "workdir": "/w", "data": "/d"}],
        "aggregation": {"strategy": change.get("strategy", "fedavg")},
    }
    (tmp_path / "bad.yaml").write_text(json.dumps(config))
    dags = tmp_path / "dags"
    dags.mkdir()
    install_federation_dag(dags, tmp_path / "bad.yaml", name="bad")
    bag = DagBag(dag_folder=str(dags))
    assert bag.dags == {}
    (error,) = bag.import_errors.values()
    assert str(tmp_path / "bad.yaml") in error and field in error
