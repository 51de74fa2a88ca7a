"""Differentially private campaigns against the real Airflow and facilities (docs/privacy.md):

1. full fine-tuning with DP-SGD for 3 rounds, site1 with DDP (two workers under torchrun): the
   manifests' epsilon of each facility is the accountant's for the parameters its metrics.json
   reported, and no metrics.json reports a training loss; site2 reports no DP parameters in
   round 1 and is set aside for it; verify passes; the campaign view shows epsilon per round;
2. LoRA with DP-SGD and budgets that two runs fit and a third does not: the campaign stops after
   round 1 with "privacy budget spent", and a warm-started campaign after it is refused in
   prepare (its lineage spent the budgets), before any Slurm job.

Starts: the session's ``testbed`` (two facilities) and ``airflow_instance``; the verification
as a subprocess; the DAG files are removed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.plugins.xffl_airflow.federation.campaign_support import ti_states
from xffl_tasks.privacy.accountant import DpRound, epsilon, params_from_metrics
from xffl_testbed.campaign import (
    LocalFacility,
    start_campaign,
    wait_for_campaign,
    write_config,
)

pytestmark = pytest.mark.slow

TRAINING = {"max_steps": 6, "learning_rate": 0.003, "threads": 1, "seed": 0, "batch_size": 8, "seq_len": 64}
PRIVACY = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
STRIP = """#!/bin/bash
# runs the facility's Python; in round 1 its training's metrics.json loses its DP parameters
real={real}
"$real" "$@" || exit $?
case " $* " in *" -m xffl_tasks.train "*) ;; *) exit 0 ;; esac
out="" prev=""
for arg in "$@"; do [ "$prev" = "--out" ] && out="$arg"; prev="$arg"; done
case "$out" in *round-0001*) ;; *) exit 0 ;; esac
exec "$real" - "$out" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.json"
metrics = json.loads(path.read_text()); metrics.pop("privacy"); path.write_text(json.dumps(metrics))
PY
"""


def slurm_jobs(facility) -> list[str]:
    return facility.ssh("sacct -c -n --parsable2 -o JobID", check=False).stdout.split()


def federation(testbed, corpora, tiny, storage, campaign: str, **extra) -> Path:
    site1, site2 = testbed.facilities
    extra.setdefault("training", TRAINING)
    return write_config(
        storage / f"{campaign}.yaml", campaign=campaign, storage=storage, base_model=tiny / "model",
        python=site1.python,
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])], **extra,
    )  # fmt: skip


def test_a_dp_campaign_keeps_the_accountants_ledger_and_sets_aside_a_facility_without_dp(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow, site2 = airflow_instance, testbed.facilities[1]
    config = federation(testbed, corpora, tiny, storage, "private", quorum=1, convergence={"max_rounds": 3},
                        privacy={**PRIVACY, "epsilon_budget": 1000.0})  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    wrapper = Path(site2.home) / "stripping-python"
    wrapper.write_text(STRIP.format(real=site2.python))
    subprocess.run(["chown", f"{site2.user}:{site2.user}", str(wrapper)], check=True)
    wrapper.chmod(0o755)
    settings["facilities"][1]["python"] = str(wrapper)
    # site1 trains with DDP: two workers under torchrun (Opacus's DPDDP), on the node's 2 CPUs
    settings["facilities"][0].update(launcher="torchrun", nproc_per_node=2)
    settings["facilities"][0]["sbatch"]["cpus_per_task"] = 2
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    dag_id = start_campaign(airflow, config, "private")
    try:
        runs = wait_for_campaign(airflow, dag_id, "private", storage / "private", timeout=1500)
        assert [r["state"] for r in runs] == ["success"] * 3, (runs, ti_states(airflow, dag_id, runs[-1]["dag_run_id"]))
        folder = storage / "private"
        manifests = [json.loads((folder / f"round-{n:04d}" / "manifest.json").read_text()) for n in range(3)]
        assert manifests[1]["facilities"]["site2"]["status"] == "rejected"
        assert "reports no DP-SGD run" in manifests[1]["missing"]["site2"]
        for number, manifest in enumerate(manifests):
            for name in ("site1", "site2"):
                entry = manifest["privacy"]["facilities"][name]
                runs_of = [r for r in entry["history"]]
                trained = not (name == "site2" and number == 1)
                assert runs_of[-1]["round"] == (number if trained else number - 1)
                if trained:  # the parameters the facility reported, as the pull read them
                    reported = json.loads((folder / f"round-{number:04d}" / "clients" / name / "metrics.json").read_text())
                    run, delta = params_from_metrics(reported["privacy"])
                    assert (runs_of[-1]["sample_rate"], runs_of[-1]["noise_multiplier"], runs_of[-1]["steps"]) == (
                        run.sample_rate, run.noise_multiplier, run.steps)
                    assert run.noise_multiplier == PRIVACY["noise_multiplier"] and run.steps == TRAINING["max_steps"]
                    assert reported["privacy"]["world_size"] == (2 if name == "site1" else 1)
                    assert not [key for key in reported if key.startswith("train_loss")]  # withheld
                    assert entry["round_epsilon"] == pytest.approx(epsilon([run], delta=delta), rel=1e-9)
                expected = epsilon([DpRound(r["sample_rate"], r["noise_multiplier"], r["steps"]) for r in runs_of],
                                   delta=entry["delta"])  # fmt: skip
                assert entry["epsilon"] == pytest.approx(expected, rel=1e-9)
        verify = subprocess.run([sys.executable, "-m", "xffl_tasks.verify", str(folder)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        from xffl_airflow.ui.campaign_view import render_page
        from xffl_airflow.ui.campaigns import read_manifests

        page = render_page(dag_id=dag_id, campaign="private", manifests=read_manifests(folder), problems=[])
        for manifest in manifests:
            shown = f'{manifest["privacy"]["facilities"]["site1"]["epsilon"]:.3f}'
            assert f'<td data-col="epsilon">{shown}</td>' in page
    finally:
        airflow.remove_dag_file(Path(airflow.dags_folder) / "xffl_federation_private.py", dag_id)


def run_epsilons(tiny: Path, corpus: str, runs: int) -> list[float]:
    """The epsilon a facility reaches after 1..runs LoRA DP-SGD runs of TRAINING on ``corpus``
    (the facility's own rules: its training split's size, q, delta)."""
    from transformers import AutoTokenizer

    from xffl_tasks.data.dataset import load_dataset
    from xffl_tasks.train.config import TrainingConfig
    from xffl_tasks.train.dp_options import plan_privacy

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    sequences = len(load_dataset(tiny / "data" / corpus, tokenizer=tokenizer, seq_len=TRAINING["seq_len"]).train)
    plan = plan_privacy(TrainingConfig(batch_size=TRAINING["batch_size"], dp_mode="dp-sgd", dp_noise_multiplier=1.0),
                        num_sequences=sequences, world_size=1)  # fmt: skip
    one = DpRound(plan.sample_rate, 1.0, TRAINING["max_steps"])
    return [epsilon([one] * n, delta=plan.delta) for n in range(1, runs + 1)]


def test_a_budget_two_rounds_spend_stops_the_campaign_and_refuses_its_warm_start(
    airflow_instance, testbed, corpora, tiny, storage
):
    airflow, (site1, site2) = airflow_instance, testbed.facilities
    budgets = {}
    for facility, corpus in ((site1, "italian"), (site2, "czech")):
        _, two, three = run_epsilons(tiny, corpus, 3)
        budgets[facility.name] = (two + three) / 2
    config = federation(testbed, corpora, tiny, storage, "budget", convergence={"max_rounds": 3}, warm_start=True,
                        privacy=PRIVACY, aggregation={"strategy": "lora-svd"},
                        training={**TRAINING, "peft": {"method": "lora", "r": 4, "alpha": 8}})  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    for entry in settings["facilities"]:
        entry["epsilon_budget"] = budgets[entry["name"]]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    dag_id = start_campaign(airflow, config, "budget")
    dag_file = Path(airflow.dags_folder) / "xffl_federation_budget.py"
    try:
        runs = wait_for_campaign(airflow, dag_id, "budget", storage / "budget", timeout=1200)
        assert [r["state"] for r in runs] == ["success", "success"], runs
        last = json.loads((storage / "budget" / "round-0001" / "manifest.json").read_text())
        assert last["decision"]["stop"] is True and last["decision"]["reason"].startswith("privacy budget spent"), last["decision"]
        jobs = {f.name: slurm_jobs(f) for f in (site1, site2)}
        # a new campaign of the DAG warm-starts from it: the same data, the budgets already spent
        run_id = airflow.trigger(dag_id, run_id="budget-next", conf={"round": 0, "campaign": "budget-next"})
        assert airflow.wait_for_run(dag_id, run_id, timeout=300) == "failed"
        states = ti_states(airflow, dag_id, run_id)
        assert states["prepare"]["state"] == "failed" and states["prepare"]["try_number"] == 1
        log = airflow.task_log(dag_id, run_id, "prepare", try_number=1)
        assert "privacy budget spent: 0 of 2 facilities could train within their budgets" in log, log[-2000:]
        assert {f.name: slurm_jobs(f) for f in (site1, site2)} == jobs
        assert not (storage / "budget-next" / "round-0000").exists()
    finally:
        airflow.remove_dag_file(dag_file, dag_id)
