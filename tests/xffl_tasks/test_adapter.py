"""Per-facility LoRA settings (lora-stacked): each facility's own rank and alpha, for the
initial adapter as for any settings. Starts no process."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.xffl_tasks.aggregate.conftest import tiny_llama
from xffl_tasks.adapter import AdapterError, LoraSettings, initial_adapter, read_adapter_config


def test_a_facility_gets_its_own_rank_and_alpha():
    campaign = LoraSettings(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    mine = campaign.for_facility(r=4, alpha=8.0)
    assert (mine.r, mine.alpha, mine.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert campaign.for_facility() == campaign and campaign.for_facility(alpha=32).r == 8
    with pytest.raises(AdapterError, match="r: must be a whole number"):
        campaign.for_facility(r=0)


def test_initial_adapters_of_two_ranks_from_one_seed(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    campaign = LoraSettings(r=8, alpha=16.0, target_modules=("q_proj",))
    small = initial_adapter(tmp_path / "base", tmp_path / "it", campaign, seed=1, r=4, alpha=8.0)
    large = initial_adapter(tmp_path / "base", tmp_path / "cz", campaign, seed=1, r=16)
    assert read_adapter_config(small) == LoraSettings(r=4, alpha=8.0, target_modules=("q_proj",))
    assert read_adapter_config(large) == LoraSettings(r=16, alpha=16.0, target_modules=("q_proj",))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a4 = load_file(str(small / "adapter_model.safetensors"))
    a16 = load_file(str(large / "adapter_model.safetensors"))
    assert a4[f"{key}.lora_A.weight"].shape == (4, 64) and a16[f"{key}.lora_A.weight"].shape == (16, 64)
    assert not a4[f"{key}.lora_B.weight"].any() and not a16[f"{key}.lora_B.weight"].any()
