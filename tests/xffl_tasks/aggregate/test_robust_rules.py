"""Median and trimmed mean on real checkpoints with one bad facility among them.

The bad facility's model is the base plus noise fifty times larger than the others'. Expected
values come from ``torch.sort`` over the float64 updates (not the engine's sorting network).
Starts no process.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.xffl_tasks.aggregate.conftest import (
    Family,
    load_tensors,
    perturb,
    tiny_llama,
    write_metrics,
)
from tests.xffl_tasks.aggregate.test_fedavg_checkpoints import ulp
from xffl_tasks.aggregate import aggregate


@pytest.fixture(scope="module")
def with_rogue(family, tmp_path_factory) -> Family:
    """The family's three clients and a fourth, 'rogue', far off (and claiming many samples)."""
    rogue = tmp_path_factory.mktemp("rogue") / "rogue"
    model = tiny_llama()
    perturb(model, 99, 0.5)
    model.save_pretrained(rogue, max_shard_size="50KB")
    write_metrics(rogue, 100_000)
    return Family(family.base, {**family.clients, "rogue": rogue})


def sorted_updates(family: Family) -> tuple[dict, dict]:
    previous = {n: t.double() for n, t in load_tensors(family.base).items()}
    clients = [load_tensors(path) for path in family.clients.values()]
    ordered = {
        n: torch.sort(torch.stack([c[n].double() - p for c in clients]), dim=0).values
        for n, p in previous.items()
    }
    return previous, ordered


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in a))


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean"])
def test_one_bad_facility_is_outvoted(with_rogue, tmp_path, strategy):
    out = tmp_path / strategy
    report = aggregate(with_rogue.base, list(with_rogue.clients.values()), out, strategy=strategy)
    assert report["weighted"] is False
    previous, ordered = sorted_updates(with_rogue)
    ours = load_tensors(out)
    for name, rows in ordered.items():
        target = (
            previous[name] + (rows[1] + rows[2]) / 2
        )  # four clients: the middle two (trim 1 at each end)
        error = (ours[name].double() - target).abs()
        bound = 0.5 * ulp(target, torch.bfloat16) + target.abs() * 2.0**-20
        assert bool((error <= bound).all()), name
    honest = Family(with_rogue.base, {k: v for k, v in with_rogue.clients.items() if k != "rogue"})
    aggregate(honest.base, list(honest.clients.values()), tmp_path / "honest")
    aggregate(with_rogue.base, list(with_rogue.clients.values()), tmp_path / "fooled")
    reference = load_tensors(tmp_path / "honest")
    assert distance(ours, reference) < distance(load_tensors(tmp_path / "fooled"), reference) / 10
    norms = {c["name"]: c["update_norm"] for c in report["clients"]}
    assert norms["rogue"] > 10 * max(v for k, v in norms.items() if k != "rogue")  # for the audit


def test_median_of_three_is_the_middle_client_exactly(family, tmp_path):
    aggregate(family.base, list(family.clients.values()), tmp_path / "out", strategy="median")
    ours = load_tensors(tmp_path / "out")
    clients = [load_tensors(path) for path in family.clients.values()]
    for name, tensor in ours.items():
        assert torch.equal(tensor, torch.stack([c[name] for c in clients]).median(dim=0).values), (
            name
        )
