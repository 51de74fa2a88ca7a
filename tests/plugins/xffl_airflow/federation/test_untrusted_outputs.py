"""A live round where two facilities return hostile outputs, and the quorum still holds.

Three facilities (site1; site2 and a third, ``site3``, on site2's cluster): site2's training
leaves a NaN in its model, site1's claims 1000 times its samples. Each does so through a
wrapper given as the facility's ``python``: it runs the real facility Python, then, for the
training (``-m xffl_tasks.train``), edits the output folder (``--out``). With quorum 2 and
``max_weight_share: 0.6`` the round succeeds without site2 (the manifest says why) and the
weights are capped at 0.6/0.4.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance`` (scheduler and
friends), as in ``test_campaign.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from xffl_testbed.campaign import LocalFacility, start_campaign, wait_for_campaign, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.airflow_live, pytest.mark.slow]

NAN_TENSOR = "model.embed_tokens.weight"

WRAPPER = """#!/bin/bash
# runs the facility's Python, then spoils the training's output ({what})
real={real}
"$real" "$@" || exit $?
case " $* " in *" -m xffl_tasks.train "*) ;; *) exit 0 ;; esac
out="" prev=""
for arg in "$@"; do [ "$prev" = "--out" ] && out="$arg"; prev="$arg"; done
exec "$real" - "$out" <<'PY'
{script}
PY
"""

PUT_NAN = f"""
import json, math, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
out = Path(sys.argv[1])
index = out / "model.safetensors.index.json"
name = json.loads(index.read_text())["weight_map"]["{NAN_TENSOR}"] if index.exists() else "model.safetensors"
tensors = load_file(out / name)
tensors["{NAN_TENSOR}"] = tensors["{NAN_TENSOR}"].clone()
tensors["{NAN_TENSOR}"][0, 0] = math.nan
save_file(tensors, out / name, metadata={{"format": "pt"}})
"""

INFLATE_SAMPLES = """
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.json"
metrics = json.loads(path.read_text())
metrics["num_samples"] *= 1000
path.write_text(json.dumps(metrics))
"""


def install_wrapper(facility, name: str, what: str, script: str) -> str:
    path = Path(facility.home) / name
    path.write_text(WRAPPER.format(what=what, real=facility.python, script=script.strip()))
    subprocess.run(["chown", f"{facility.user}:{facility.user}", str(path)], check=True)
    path.chmod(0o755)
    return str(path)


def test_a_nan_model_is_left_out_and_inflated_samples_are_capped(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    pythons = {
        "site1": install_wrapper(site1, "inflating-python", "num_samples x1000", INFLATE_SAMPLES),
        "site2": install_wrapper(site2, "nan-python", f"a NaN in {NAN_TENSOR}", PUT_NAN),
        "site3": site2.python,
    }
    # site3 shares site2's account: a workdir of its own keeps their outputs apart
    site3_workdir = Path(site2.workdir) / "site3"
    site3_workdir.mkdir(exist_ok=True)
    subprocess.run(["chown", f"{site2.user}:{site2.user}", str(site3_workdir)], check=True)
    config = write_config(
        storage / "untrusted.yaml", campaign="untrusted", storage=storage, base_model=tiny / "model",
        python=site1.python, training=TRAINING,
        facilities=[
            LocalFacility(site1, corpora[site1.name]),
            LocalFacility(site2, corpora[site2.name]),
            LocalFacility(site2, corpora[site2.name], name="site3", workdir=str(site3_workdir)),
        ],
        quorum=2, aggregation={"strategy": "fedavg", "max_weight_share": 0.6}, convergence={"max_rounds": 1},
    )  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    for entry in settings["facilities"]:
        entry["python"] = pythons[entry["name"]]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    dag_id = start_campaign(airflow, config, "untrusted")
    runs = wait_for_campaign(airflow, dag_id, "untrusted", storage / "untrusted", timeout=900)
    states = ti_states(airflow, dag_id, runs[0]["dag_run_id"])
    failures = {f.name: f.read_text() for f in (storage / "untrusted").glob("round-*/failures/*") if f.is_file()}
    assert [r["state"] for r in runs] == ["success"], (states, failures)
    assert states["aggregate"]["state"] == "success" and states["aggregate"]["try_number"] == 1
    manifest = json.loads((storage / "untrusted" / "round-0000" / "manifest.json").read_text())
    assert manifest["participants"] == ["site1", "site3"]
    assert manifest["facilities"]["site2"]["status"] == "rejected"
    reason = manifest["missing"]["site2"]
    assert f"tensor '{NAN_TENSOR}' holds nan" in reason and "NaN or Inf" in reason, reason
    assert manifest["rejected"]["site2"] == reason
    assert manifest["weights"] == {"site1": 0.6, "site3": 0.4}
    assert manifest["facilities"]["site1"]["weight"] == 0.6
    assert manifest["facilities"]["site3"]["weight"] == 0.4
    report = json.loads(
        (storage / "untrusted" / "round-0000" / "global" / "aggregation.json").read_text()
    )
    assert [c["name"] for c in report["clients"]] == ["site1", "site3"]
    assert report["clients"][0]["num_samples"] == 1000 * report["clients"][1]["num_samples"]
