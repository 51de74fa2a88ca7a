"""Transfer options, progress lines and the rate cap (pure; the clock is a list of numbers)."""

from __future__ import annotations

import pytest
from xffl_airflow.transfer import TransferOptions
from xffl_airflow.transfer.progress import ProgressLog, RateLimiter, format_progress
from xffl_airflow.transfer.runner import backoff_delay


def test_defaults_stay_within_the_openssh_request_limit():
    options = TransferOptions()
    assert options.block_size == 261120
    assert options.ciphers[0] == "aes128-gcm@openssh.com"


def test_tuning_keywords_become_options():
    options = TransferOptions.from_tuning(
        {"max_requests": 16, "max_mbps": 2.5, "ciphers": ["aes256-ctr"]}
    )
    assert (options.max_requests, options.max_mbps, options.ciphers) == (16, 2.5, ("aes256-ctr",))


def test_an_unknown_keyword_is_named():
    with pytest.raises(
        ValueError, match="unknown transfer option.*max_request\\b.*known: .*max_requests"
    ):
        TransferOptions.from_tuning({"max_request": 16})


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ({"max_requests": 0}, "max_requests must be a whole number >= 1"),
        ({"block_size": 100}, "block_size must be at least 1024"),
        ({"retries": -1}, "retries must be a whole number >= 0"),
        ({"channels": 1.5}, "channels must be a whole number"),
        ({"max_mbps": 0}, "max_mbps must be a positive number"),
        ({"backoff": -1}, "backoff must be a non-negative number"),
        ({"ciphers": "aes128-ctr"}, "ciphers must be a non-empty list"),
    ],
)
def test_bad_values_are_named(tuning, message):
    with pytest.raises(ValueError, match=message):
        TransferOptions.from_tuning(tuning)


def test_a_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_unchanged must be true or false"):
        TransferOptions(skip_unchanged="no")


def test_progress_line():
    line = format_progress("push m -> site1:/w/m", 512 * 2**20, 1024 * 2**20, 4.0)
    assert line == "push m -> site1:/w/m: 512.0/1024.0 MiB (50%), 134.2 MB/s, ETA 4s"
    assert format_progress("x", 10, 10, 1.0).endswith("(100%), 0.0 MB/s, done")
    assert format_progress("x", 0, 10, 0.0).endswith("ETA unknown")
    assert format_progress("x", 1_000_000, 1_000_000_000, 1.0).endswith("1.0 MB/s, ETA 16m39s")


def test_progress_logs_every_tenth_and_every_interval():
    now = [0.0]
    lines: list[str] = []
    progress = ProgressLog("t", 1000, interval=5.0, clock=lambda: now[0], emit=lines.append)
    progress.advance(50)  # 5 %, 0 s: nothing yet
    assert lines == []
    now[0] = 1.0
    progress.advance(50)  # 10 %
    now[0] = 2.0
    progress.advance(10)  # 11 %, 1 s after the last line
    assert len(lines) == 1 and "(10%)" in lines[0]
    now[0] = 7.5
    progress.advance(10)  # 12 %, 6.5 s after the last line
    assert len(lines) == 2 and "(12%)" in lines[1]
    progress.advance(880)
    assert lines[-1].endswith("done")


def test_the_rate_cap_paces_sends():
    now = [100.0]
    limiter = RateLimiter(1.0, clock=lambda: now[0])  # 1 MB/s
    assert limiter.delay(500_000) == 0.0
    assert limiter.delay(500_000) == pytest.approx(0.5)
    now[0] = 103.0  # idle time is not saved up
    assert limiter.delay(1_000_000) == 0.0
    assert limiter.delay(1_000_000) == pytest.approx(1.0)
    assert RateLimiter(None).delay(10**12) == 0.0


def test_backoff_doubles_is_capped_and_jittered():
    assert backoff_delay(1, 1.0, rng=lambda: 1.0) == 1.0
    assert backoff_delay(3, 1.0, rng=lambda: 1.0) == 4.0
    assert backoff_delay(3, 1.0, rng=lambda: 0.0) == 2.0
    assert backoff_delay(10, 1.0, rng=lambda: 1.0) == 30.0


def test_progress_stays_true_when_a_file_resumes_or_starts_over():
    from pathlib import Path

    from xffl_airflow.ssh import SSHTarget
    from xffl_airflow.transfer import RemoteFacility
    from xffl_airflow.transfer.runner import TransferRun

    run = TransferRun(
        facility=RemoteFacility("site1", "facility_site1", "/w"),
        target=SSHTarget(conn_id="facility_site1", host="h", port=22, username="u", known_hosts=""),
        options=TransferOptions(),
        local_dir=Path("/m"),
        remote_dir="/w/m",
    )
    run.start_progress(100)
    run.restart_at("a.bin", 40)  # a verified prefix kept
    run.moved("a.bin", 30)  # then sent
    assert run.progress.done == 70
    run.restart_at("a.bin", 20)  # link lost; the next attempt keeps less
    assert run.progress.done == 20
    run.restart_at("a.bin", 0)  # a mismatch: from the start
    run.moved("b.bin", 5)
    assert run.progress.done == 5
