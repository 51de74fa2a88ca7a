"""How a federation names its DAG, its campaigns and its round runs: one module, pure."""

from __future__ import annotations

from datetime import datetime

import pytest
from xffl_airflow.federation.errors import RunConfError
from xffl_airflow.federation.names import (
    campaign_for_run,
    check_round,
    dag_id_for,
    in_namespace,
    parse_run_id,
    run_id,
)


def test_run_ids_round_trip():
    assert run_id("demo-20261125t1900", 3) == "xffl__demo-20261125t1900__round-0003"
    assert parse_run_id(run_id("demo", 12)) == ("demo", 12)
    assert parse_run_id("manual__2026-11-25T19:00:00") is None


def test_dag_ids_write_dashes_as_underscores():
    assert dag_id_for("demo-lora") == "xffl_demo_lora"


def test_the_campaign_of_a_run():
    at = datetime(2026, 12, 6, 19, 30)
    assert campaign_for_run("demo", requested=None, run_type="manual", logical_date=at) == "demo"
    assert campaign_for_run("demo", requested=None, run_type="scheduled", logical_date=at) == "demo-20261206t1930"
    assert campaign_for_run("demo", requested="exp1", run_type="scheduled", logical_date=at) == "exp1"
    with pytest.raises(RunConfError, match="params.campaign: a campaign name is 1-64 of"):
        campaign_for_run("demo", requested="../x", run_type="manual", logical_date=None)


def test_a_configs_namespace_is_its_campaign_and_its_scheduled_ones():
    assert in_namespace("demo", "demo") and in_namespace("demo-20261206t1930", "demo")
    assert in_namespace("demo-lora", "demo")  # the name alone cannot tell: ownership does
    assert not in_namespace("demo_x", "demo") and not in_namespace("dem", "demo")


@pytest.mark.parametrize("value", [-1, True, "1", 1.0, 1_000_001])
def test_rounds_are_whole_numbers_in_range(value):
    with pytest.raises(RunConfError, match="params.round"):
        check_round(value)
    assert check_round(7) == 7
