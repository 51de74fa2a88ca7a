"""lora-stacked under a declared claim bound: a facility claiming more samples than its
``max_samples`` is left out with the claim and the bound named, and the update is the others'
exactly (the same bytes as stacking them alone). Starts no process."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.xffl_tasks.aggregate.conftest import make_family
from tests.xffl_tasks.aggregate.test_lora_stacked import FACILITIES, make_adapter
from xffl_tasks.aggregate import AggregationError, aggregate


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_claim_above_the_bound_leaves_the_facility_out_of_the_stack(tmp_path):
    base = make_family(tmp_path / "family", torch.float32).base
    clients = [make_adapter(base, tmp_path / name, *spec, seed=i) for i, (name, spec) in enumerate(FACILITIES.items())]
    bounded = aggregate(base, clients, tmp_path / "out", strategy="lora-stacked", names=list(FACILITIES),
                        max_samples=[1000, 250, None], min_clients=2)  # fmt: skip
    assert list(bounded["rejected"]) == ["cz"]
    assert "num_samples 300 exceeds the facility's declared bound of 250 samples" in bounded["rejected"]["cz"]
    aggregate(base, [clients[0], clients[2]], tmp_path / "alone", strategy="lora-stacked", names=["it", "de"])
    for name in ("base_hashes.json",):
        assert digest(tmp_path / "out" / name) == digest(tmp_path / "alone" / name)
    with pytest.raises(AggregationError, match="exceeds the facility's declared bound"):
        aggregate(base, clients, tmp_path / "none", strategy="lora-stacked", names=list(FACILITIES),
                  max_samples=[10, 10, 10], min_clients=2)  # fmt: skip
