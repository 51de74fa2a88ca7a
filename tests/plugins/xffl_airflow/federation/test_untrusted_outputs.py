"""A live lora-stacked campaign of five rounds while one facility of three returns, in turn,
hostile outputs (docs/security.md, R5; docs/aggregation.md, lora-stacked):

- round 0: an adapter whose safetensors header holds a lone surrogate (the library refuses it);
- round 1: 20,000 files (more than the pull's budget);
- round 2: finite values near 3e38 that overflow the merged base;
- round 3: a validation loss of 1e308;
- round 4: a claim of 10^12 samples (its declared bound is 100,000).

Each round goes on with the two honest facilities (quorum 2), which train adapters of ranks 4
and 16: the hostile one is left out with its reason in the manifest, and the campaign view
renders every round. After each round the canonical base equals the previous one plus the
exact weighted update, computed here in float64 from the adapters the facilities sent; the
facilities' merged bases have the manifest's hashes; the chain verifies; the release (the best
round's merged base) loads with transformers.

The hostile facility trains for real: its ``python`` is a wrapper that runs the facility's Python
and then, for the training (``-m xffl_tasks.train``), spoils its output folder (``--out``).
site3 is a third facility on site2's cluster (its own workdir).

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance``; the verification as
a subprocess; the DAG file is removed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.plugins.xffl_airflow.federation.campaign_support import ti_states
from xffl_tasks.manifest import sha256_file
from xffl_testbed.campaign import (
    LocalFacility,
    start_campaign,
    wait_for_campaign,
    wait_for_release,
    write_config,
)

pytestmark = pytest.mark.slow

CAMPAIGN, DAG_ID = "untrusted", "xffl_untrusted"
ROUNDS = 5
WRAPPER = """#!/bin/bash
# runs the facility's Python, then spoils the training's output, a different way each round
real={real}
"$real" "$@" || exit $?
case " $* " in *" -m xffl_tasks.train "*) ;; *) exit 0 ;; esac
out="" prev=""
for arg in "$@"; do [ "$prev" = "--out" ] && out="$arg"; prev="$arg"; done
exec "$real" - "$out" <<'PY'
{script}
PY
"""
SPOIL = r'''
import json, re, struct, sys
from pathlib import Path
out = Path(sys.argv[1])
round_number = int(re.search(r"round-(\d+)", str(out)).group(1))
weights, metrics = out / "adapter_model.safetensors", out / "metrics.json"
if round_number == 0:  # a lone surrogate in the header's __metadata__
    data = weights.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = {**header.get("__metadata__", {}), "note": "SURROGATE"}
    text = json.dumps(header).replace('"SURROGATE"', '"\\ud800"')
    text += " " * (-len(text) % 8)
    weights.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data[8 + size:])
elif round_number == 1:  # far more files than the budget
    for index in range(20000):
        (out / f"junk-{index:05d}.txt").write_text("x")
elif round_number == 2:  # finite values whose products overflow float32
    import torch
    from safetensors.torch import load_file, save_file
    tensors = {name: torch.full_like(t, 3e38) for name, t in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
elif round_number == 3:
    values = json.loads(metrics.read_text()); values["val_loss_before"] = 1e308; metrics.write_text(json.dumps(values))
elif round_number == 4:
    values = json.loads(metrics.read_text()); values["num_samples"] = 10**12; metrics.write_text(json.dumps(values))
'''
EXPECTED = {
    0: "adapter_model.safetensors",
    1: "pull refused before writing anything",
    2: "non-finite",
    3: "val_loss_before",
    4: "exceeds the facility's declared bound of 100000 samples",
}


def install_wrapper(facility, name: str) -> str:
    path = Path(facility.home) / name
    path.write_text(WRAPPER.format(real=facility.python, script=SPOIL.strip()))
    subprocess.run(["chown", f"{facility.user}:{facility.user}", str(path)], check=True)
    path.chmod(0o755)
    return str(path)


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def check_exact_update(round_dir: Path, previous_base: Path) -> float:
    """The canonical base of ``round_dir`` against the previous base plus sum c_i B_i A_i in
    float64 (c_i: the facility's normalised weight x alpha_i / r_i); the largest difference."""
    from xffl_tasks.adapter import lora_pairs

    report = json.loads((round_dir / "global" / "aggregation.json").read_text())
    before, after = load(previous_base), load(round_dir / "global" / "base")
    expected = {name: t.double() for name, t in before.items()}
    for client in report["clients"]:
        folder = round_dir / "clients" / client["name"]
        settings = json.loads((folder / "adapter_config.json").read_text())
        scale = client["normalized_weight"] * settings["lora_alpha"] / settings["r"]
        tensors = load(folder)
        for module, (a_name, b_name) in lora_pairs(tensors).items():
            expected[f"{module}.weight"] += scale * (tensors[b_name].double() @ tensors[a_name].double())
    worst = 0.0
    for name, value in after.items():
        if torch.equal(before[name], value) and torch.equal(expected[name], before[name].double()):
            continue  # not adapted: the same bytes
        difference = (value.double() - expected[name]).abs().max().item()
        scale = max(1.0, expected[name].abs().max().item())
        assert difference <= 4e-7 * scale, f"{round_dir.name} {name}: {difference} off the exact update"
        worst = max(worst, difference)
    return worst


def test_a_stacked_campaign_goes_on_while_one_facility_returns_hostile_outputs(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow = airflow_instance
    site1, site2 = testbed.facilities
    site3_workdir = Path(site2.workdir) / "site3"
    site3_workdir.mkdir(exist_ok=True)
    subprocess.run(["chown", f"{site2.user}:{site2.user}", str(site3_workdir)], check=True)
    config = write_config(
        storage / f"{CAMPAIGN}.yaml", campaign=CAMPAIGN, storage=storage, base_model=tiny / "model",
        python=site1.python,
        training={"max_steps": 8, "learning_rate": 0.02, "threads": 1, "seed": 0, "batch_size": 8, "seq_len": 64,
                  "peft": {"method": "lora", "r": 8, "alpha": 16}},
        facilities=[
            LocalFacility(site1, corpora[site1.name]),
            LocalFacility(site2, corpora[site2.name]),
            LocalFacility(site2, corpora[site2.name], name="site3", workdir=str(site3_workdir)),
        ],
        quorum=2, aggregation={"strategy": "lora-stacked", "max_weight_share": 0.75},
        convergence={"max_rounds": ROUNDS}, release={"approval": False},
    )  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    ranks = {"site1": {"r": 4, "alpha": 8}, "site2": {"r": 8}, "site3": {"r": 16, "alpha": 32}}
    for entry in settings["facilities"]:
        entry["peft"], entry["max_samples"] = ranks[entry["name"]], 100000
        if entry["name"] == "site2":
            entry["python"] = install_wrapper(site2, "spoiling-python")
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    dag_id = start_campaign(airflow, config, CAMPAIGN)
    try:
        runs = wait_for_campaign(airflow, dag_id, CAMPAIGN, storage / CAMPAIGN, timeout=2400)
        states = ti_states(airflow, dag_id, runs[-1]["dag_run_id"])
        assert [r["state"] for r in runs] == ["success"] * ROUNDS, (runs, states)
        folder = storage / CAMPAIGN
        manifests = [json.loads((folder / f"round-{n:04d}" / "manifest.json").read_text()) for n in range(ROUNDS)]
        for number, manifest in enumerate(manifests):
            assert manifest["participants"] == ["site1", "site3"], (number, manifest["missing"])
            assert manifest["facilities"]["site2"]["status"] == "rejected", (number, manifest["missing"])
            assert EXPECTED[number] in manifest["missing"]["site2"], (number, manifest["missing"]["site2"])
            assert manifest["aggregation"]["strategy"] == "lora-stacked"
            previous = tiny / "model" if number == 0 else folder / f"round-{number - 1:04d}" / "global" / "base"
            check_exact_update(folder / f"round-{number:04d}", previous)
        # the facilities' own merged bases (the last round's) are the canonical one, by hash
        canonical = {k.removeprefix("global/base/"): v for k, v in manifests[ROUNDS - 2]["outputs"].items()
                     if k.startswith("global/base/")}  # fmt: skip
        for workdir in (Path(site1.workdir), site3_workdir):
            merged = workdir / DAG_ID / CAMPAIGN / "stacked-base" / f"round-{ROUNDS - 1:04d}"
            assert {p.name: sha256_file(p) for p in merged.iterdir() if p.is_file()} == canonical
            assert sorted(p.name for p in merged.parent.iterdir()) == [merged.name]  # earlier ones removed
        # the campaign view renders every round, the hostile one's reasons among them
        from xffl_airflow.ui.campaign_view import render_page
        from xffl_airflow.ui.campaigns import read_manifests

        page = render_page(dag_id=dag_id, campaign=CAMPAIGN, manifests=read_manifests(folder), problems=[])
        assert all(f'data-round="{n}"' in page for n in range(ROUNDS))
        assert "val_loss_before" in page and "10^12" not in page
        verify = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(folder)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # the release: the best round's merged base, a full model transformers loads
        release = wait_for_release(airflow, CAMPAIGN, CAMPAIGN, timeout=900)
        assert release["state"] == "success", release
        released = sorted((storage / "_releases" / CAMPAIGN).glob("[0-9]*"))
        assert [p.name for p in released] == ["1"]
        check = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(released[0])], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(released[0] / "model"), local_files_only=True)
        assert model.config.model_type == "llama"
    finally:
        airflow.remove_dag_file(Path(airflow.dags_folder) / f"xffl_federation_{CAMPAIGN}.py", dag_id)
