"""The input checks every aggregation makes before reading a byte (``xffl_tasks.aggregate.inputs``),
and that both the full-model and the adapter aggregations go through them."""

from pathlib import Path

import pytest

from xffl_tasks.aggregate import aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.inputs import check_client_inputs, check_min_clients


@pytest.mark.parametrize(
    "value, message",
    [
        (True, "min_clients True is not a whole number"),
        (1.5, "min_clients 1.5 is not a whole number"),
        (0, "min_clients 0 must be from 1 to 3 (the clients)"),
        (4, "min_clients 4 must be from 1 to 3 (the clients)"),
    ],
)
def test_min_clients_out_of_range_is_refused_by_name(value, message):
    with pytest.raises(AggregationError) as error:
        check_min_clients(value, 3)
    assert str(error.value) == message


def test_min_clients_defaults_to_every_client():
    assert check_min_clients(None, 3) == 3
    assert check_min_clients(2, 3) == 2


def test_the_clients_are_resolved_and_the_output_checked(tmp_path):
    clients = [tmp_path / "site1", tmp_path / "site2"]
    paths, names, needed = check_client_inputs(
        tmp_path / "prev",
        clients,
        tmp_path / "out",
        names=None,
        min_clients=None,
        max_weight_share=None,
    )
    assert (paths, names, needed) == (clients, ["site1", "site2"], 2)
    with pytest.raises(AggregationError, match="no client folders"):
        check_client_inputs(
            tmp_path / "prev",
            [],
            tmp_path / "out",
            names=None,
            min_clients=None,
            max_weight_share=None,
        )
    (tmp_path / "out").mkdir()
    with pytest.raises(AggregationError, match="out"):
        check_client_inputs(
            tmp_path / "prev",
            clients,
            tmp_path / "out",
            names=None,
            min_clients=None,
            max_weight_share=None,
        )


@pytest.mark.parametrize("strategy", ["fedavg", "lora-fedavg"])
def test_both_aggregations_refuse_a_bad_min_clients_before_reading(tmp_path, strategy):
    missing = Path(tmp_path / "nowhere")  # never read: the input checks come first
    with pytest.raises(AggregationError, match=r"min_clients 5 must be from 1 to 2"):
        aggregate(
            missing,
            [missing / "a", missing / "b"],
            tmp_path / "out",
            strategy=strategy,
            min_clients=5,
        )
