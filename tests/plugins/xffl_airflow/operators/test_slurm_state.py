"""Which tries of a task instance form one series (since its last clear): pure arithmetic on
what Airflow hands the task (``try_number``, ``max_tries``) and the task's ``retries``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from xffl_airflow.operators.slurm_state import first_try_of_series, series_start


@pytest.mark.parametrize(
    ("try_number", "max_tries", "retries", "first"),
    [
        (1, 2, 2, 1),  # the first try of a task with 2 retries
        (2, 2, 2, 1),  # its first retry
        (3, 2, 2, 1),  # its last retry
        (4, 5, 2, 4),  # cleared after try 3: max_tries = 3 + 2, the next try starts a series
        (5, 5, 2, 4),  # the retry after that
        (1, 0, 0, 1),  # no retries
        (2, 1, 0, 2),  # no retries, cleared after try 1
    ],
)
def test_the_series_starts_at_max_tries_minus_retries_plus_one(
    try_number, max_tries, retries, first
):
    assert series_start(try_number=try_number, max_tries=max_tries, retries=retries) == first


@pytest.mark.parametrize(
    ("try_number", "max_tries", "retries"),
    [
        (1, 5, 2),  # a start after the running try: the numbers do not add up
        (3, 0, 2),  # a start before try 1 (retries raised since)
    ],
)
def test_numbers_that_do_not_add_up_give_no_series(try_number, max_tries, retries):
    assert series_start(try_number=try_number, max_tries=max_tries, retries=retries) is None


def test_a_task_instance_without_the_numbers_gives_no_series():
    assert first_try_of_series(SimpleNamespace(dag_id="d"), 2) is None
    assert first_try_of_series(SimpleNamespace(try_number=2, max_tries=None), 2) is None
    assert first_try_of_series(SimpleNamespace(try_number=0, max_tries=2), 2) is None
    assert first_try_of_series(SimpleNamespace(try_number=2, max_tries=0), None) == 1
    assert first_try_of_series(SimpleNamespace(try_number=4, max_tries=5), 2) == 4
