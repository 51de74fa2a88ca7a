"""``problem_reason``: two poll tries that fail alike read alike, whatever their count."""

from xffl_airflow.triggers.slurm import problem_reason


def test_the_try_count_and_delay_are_dropped():
    assert (
        problem_reason("connection facility_a: boom (try 12, again in 60 s)")
        == "connection facility_a: boom"
    )


def test_two_tries_of_one_cause_have_one_reason_and_another_cause_differs():
    first = problem_reason("ChannelOpenError: SSH connection closed (try 1, again in 2 s)")
    second = problem_reason("ChannelOpenError: SSH connection closed (try 2, again in 4 s)")
    expired = problem_reason(
        "certificate of facility_a expired at 2026-12-04T18:40:00Z (try 3, again in 8 s)"
    )
    assert first == second == "ChannelOpenError: SSH connection closed"
    assert expired != first


def test_a_try_part_that_is_not_at_the_end_is_kept():
    text = "odd (try 3, again in 5 s) then more"
    assert problem_reason(text) == text
