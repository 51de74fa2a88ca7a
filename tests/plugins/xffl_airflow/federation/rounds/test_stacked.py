"""A lora-stacked round's plan, offline: round 0 pushes the base and trains fresh adapters of
each facility's rank on it; round k pushes the update, which each facility merges into its round
k-1 base, and a facility that did not train in round k-1 gets the canonical base instead."""

from __future__ import annotations

import shlex

import torch
import yaml
from xffl_airflow.federation.rounds.store import write_step

from tests.plugins.xffl_airflow.federation.rounds.round_support import (
    model_folder,
    prepare,
    write_config,
)
from xffl_tasks.manifest import hash_tree, write_manifest


def stacked_config(tmp_path):
    config = write_config(tmp_path, quorum=1, aggregation={"strategy": "lora-stacked"},
                          training={"seed": 5, "peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}})  # fmt: skip
    data = yaml.safe_load(config.read_text())
    data["facilities"][1]["peft"] = {"r": 16, "alpha": 32}
    config.write_text(yaml.safe_dump(data))
    model_folder(tmp_path / "base", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(6, 10)})
    return config


def words(command: str) -> list[str]:
    return shlex.split(command.split(" && ")[0])


def test_round_0_pushes_the_base_and_trains_each_facilitys_rank_on_it(tmp_path, monkeypatch):
    sealed = prepare(monkeypatch, stacked_config(tmp_path))
    plan = sealed.plan
    assert plan.input_model_sha256 == {} and plan.input_model == str(tmp_path / "base")
    f1, f2 = plan.facility("f1"), plan.facility("f2")
    assert (f1.lora_r, f1.lora_alpha, f2.lora_r, f2.lora_alpha) == (4, 8.0, 16, 32.0)
    assert f1.base_push == "xffl_offline/offline/base"
    assert (f1.adapter_bytes, f2.adapter_bytes) == (4 * 4 * 16, 16 * 4 * 16)  # r x 4 bytes x (6 + 10)
    argv = words(f1.command)
    assert argv[argv.index("--model") + 1] == "/home/f1/xffl/xffl_offline/offline/base"
    assert argv[argv.index("--peft") + 1] == "lora" and argv[argv.index("--lora-r") + 1] == "4"
    assert argv[argv.index("--seed") + 1] == "5" and "--stacked-update" not in argv and "&&" not in f1.command


def round_0_output(tmp_path, sealed):
    """What the aggregation and finalize of round 0 would leave: the update, the base, a manifest."""
    out = sealed.layout.global_model(0)
    (out / "stacked_update").mkdir(parents=True)
    (out / "stacked_update" / "stacked_update.json").write_text("{}")
    model_folder(out / "base", {"model.layers.0.self_attn.q_proj.weight": torch.ones(6, 10)})
    (out / "base_hashes.json").write_text("{}")
    outputs = {f"global/{k}": v for k, v in hash_tree(out).items()}
    write_manifest(sealed.layout.round_dir(0), {"campaign": "offline", "round": 0, "dag_id": "xffl_offline",
                                                "outputs": outputs, "decision": {"stop": False}}, None)  # fmt: skip


def test_round_1_merges_the_update_or_catches_up_with_the_canonical_base(tmp_path, monkeypatch):
    config = stacked_config(tmp_path)
    first = prepare(monkeypatch, config)
    write_step(first, "f1", "train", {"job_id": "1"})  # f2's training failed in round 0
    round_0_output(tmp_path, first)
    plan = prepare(monkeypatch, config, round_number=1).plan
    assert set(plan.input_model_sha256) == {"stacked_update.json"}
    f1, f2 = plan.facility("f1"), plan.facility("f2")
    assert f1.base_push is None and f2.base_push == "xffl_offline/offline/stacked-base/round-0001"
    assert plan.peft.base_model == str(first.layout.global_model(0) / "base")
    merged = words(f1.command)
    assert merged[merged.index("--model") + 1] == "/home/f1/xffl/xffl_offline/offline/base"
    assert merged[merged.index("--stacked-update") + 1] == "/home/f1/xffl/xffl_offline/offline/round-0001/global"
    assert merged[merged.index("--merged-base") + 1] == "/home/f1/xffl/xffl_offline/offline/stacked-base/round-0001"
    assert merged[merged.index("--seed") + 1] == "6"
    caught_up = words(f2.command)
    assert caught_up[caught_up.index("--model") + 1] == "/home/f2/xffl/xffl_offline/offline/stacked-base/round-0001"
    assert "--stacked-update" not in caught_up
    assert f1.command.endswith(
        "&& find /home/f1/xffl/xffl_offline/offline/stacked-base -mindepth 1 -maxdepth 1 -name 'round-*' "
        "! -name round-0001 -exec rm -rf -- {} +"
    )
