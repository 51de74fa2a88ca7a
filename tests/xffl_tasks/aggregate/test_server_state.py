"""Server optimisers over chained rounds on real checkpoints; their state kept as safetensors.

Each round's output is checked against the pure step functions run in float64 on that round's
actual inputs (the previous model and state as stored). Starts no process.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from tests.xffl_tasks.aggregate.conftest import CLIENT_SAMPLES, load_tensors
from tests.xffl_tasks.aggregate.test_fedavg_checkpoints import ulp
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.strategies.fedadam import adam_step
from xffl_tasks.aggregate.strategies.fedavgm import momentum_step
from xffl_tasks.aggregate.strategies.fedyogi import yogi_step

OPTIMISERS = {
    "fedavgm": (momentum_step, ("momentum",), {"server_learning_rate": 0.7, "momentum": 0.9}),
    "fedadam": (
        adam_step,
        ("first_moment", "second_moment"),
        {"server_learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    ),
    "fedyogi": (
        yogi_step,
        ("first_moment", "second_moment"),
        {"server_learning_rate": 0.01, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3},
    ),
}


def read_state(folder, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / "server_state" / f"{name}.safetensors"), "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()  # noqa: SIM118


def expected_round(previous_folder, family, step, state_names, options, first: bool):
    previous = {n: t.double() for n, t in load_tensors(previous_folder).items()}
    weights = [CLIENT_SAMPLES[name] / sum(CLIENT_SAMPLES.values()) for name in family.clients]
    clients = [load_tensors(path) for path in family.clients.values()]
    state = [
        {n: torch.zeros_like(t) for n, t in previous.items()}
        if first
        else {n: t.double() for n, t in read_state(previous_folder, s)[0].items()}
        for s in state_names
    ]
    results = {}
    for name, value in previous.items():
        mean = sum(w * (c[name].double() - value) for w, c in zip(weights, clients))
        change, *new_state = step(mean, *(s[name] for s in state), **options)
        results[name] = (value, change, new_state)
    return results


@pytest.mark.parametrize("strategy", list(OPTIMISERS))
def test_rounds_chain_through_the_server_state(family, tmp_path, strategy):
    step, state_names, options = OPTIMISERS[strategy]
    previous_folder = family.base
    for round_ in (1, 2, 3):
        out = tmp_path / f"round{round_}"
        expected = expected_round(
            previous_folder, family, step, state_names, options, first=round_ == 1
        )
        report = aggregate(
            previous_folder, list(family.clients.values()), out, strategy=strategy, options=options
        )
        assert report["strategy"] == strategy and report["options"] == options
        assert report["server_state_rounds"] == round_
        ours = load_tensors(out)
        for index, state_name in enumerate(state_names):
            stored, metadata = read_state(out, state_name)
            assert metadata == {
                "format": "xffl-server-state/1",
                "strategy": strategy,
                "state": state_name,
                "rounds": str(round_),
            }
            assert set(stored) == set(ours)
            for name, (_, _, new_state) in expected.items():
                assert stored[name].dtype == torch.float32
                assert torch.allclose(
                    stored[name].double(), new_state[index], rtol=1e-4, atol=1e-9
                ), (state_name, name)
            assert f"server_state/{state_name}.safetensors" in report["output_files"]
            if round_ > 1:
                assert f"server_state/{state_name}.safetensors" in report["previous_files"]
        moved = 0.0
        for name, (value, change, _) in expected.items():
            target = value + change
            error = (ours[name].double() - target).abs()
            bound = (
                0.5 * ulp(target, torch.bfloat16) + 1e-4 * change.abs() + target.abs() * 2.0**-20
            )
            assert bool((error <= bound).all()), (name, float((error - bound).max()))
            moved += float((change * change).sum())
        assert report["global_update_norm"] == pytest.approx(math.sqrt(moved), rel=1e-4)
        previous_folder = out


def test_momentum_zero_and_unit_rate_writes_exactly_fedavg(family, tmp_path):
    clients = list(family.clients.values())
    fedavg = aggregate(family.base, clients, tmp_path / "fedavg")
    options = {"momentum": 0.0, "server_learning_rate": 1.0}
    fedavgm = aggregate(
        family.base, clients, tmp_path / "fedavgm", strategy="fedavgm", options=options
    )
    weights = {
        k: v for k, v in fedavgm["output_files"].items() if not k.startswith("server_state/")
    }
    assert weights == fedavg["output_files"]


def test_changing_strategy_over_a_state_is_refused(family, tmp_path):
    clients = list(family.clients.values())
    aggregate(family.base, clients, tmp_path / "round1", strategy="fedadam")
    with pytest.raises(AggregationError) as error:
        aggregate(tmp_path / "round1", clients, tmp_path / "round2", strategy="fedyogi")
    message = str(error.value)
    assert (
        "server_state/first_moment.safetensors" in message
        and "'fedadam'" in message
        and "fedyogi" in message
    )
    assert not (tmp_path / "round2").exists()
    (tmp_path / "round1" / "server_state" / "second_moment.safetensors").unlink()
    with pytest.raises(AggregationError, match="server_state/second_moment.safetensors is missing"):
        aggregate(tmp_path / "round1", clients, tmp_path / "round2", strategy="fedadam")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round1"]


def test_a_stateless_strategy_does_not_carry_the_state(family, tmp_path):
    from transformers import AutoModelForCausalLM

    clients = list(family.clients.values())
    aggregate(family.base, clients, tmp_path / "round1", strategy="fedavgm")
    AutoModelForCausalLM.from_pretrained(tmp_path / "round1")  # the state folder is no obstacle
    report = aggregate(tmp_path / "round1", clients, tmp_path / "round2")
    assert not (tmp_path / "round2" / "server_state").exists()
    assert report["server_state_rounds"] is None
    assert "server_state/momentum.safetensors" not in report["previous_files"]
