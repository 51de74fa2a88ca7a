"""Transfer commands framed against login-shell output: literal outputs of noisy shells, the
messages for a timeout and for an SFTP subsystem broken by the shell, and (with a fake SSH
connection, nothing started) that the latter ends the transfer after one attempt."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import asyncssh
import pytest
from xffl_airflow.transfer import remote_exec, session
from xffl_airflow.transfer.errors import RetryableFailure, TransferError
from xffl_airflow.transfer.facility import RemoteFacility
from xffl_airflow.transfer.options import TransferOptions
from xffl_airflow.transfer.remote_exec import (
    FramedCommand,
    noisy_sftp_message,
    read_result,
    timeout_message,
)
from xffl_airflow.transfer.runner import TransferRun

DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
BANNER = b"Welcome to login01\nQuota: 91% of /home used\n\x1b]0;user@login01\x07no newline"


def frame(
    command: FramedCommand, out: bytes, err: bytes = b"", status: int = 0
) -> tuple[bytes, bytes]:
    """What a facility sends back for ``command`` when its shell prints BANNER first."""
    begin = f"@@xffl-frame:{command.nonce}:begin".encode()
    end = f"@@xffl-frame:{command.nonce}:end".encode()
    stdout = BANNER + b"\n" + begin + b"\n" + out + b"\n" + end + b" %d\n" % status + b"logout\n"
    stderr = b"module: gcc loaded\n" + b"\n" + begin + b"\n" + err + b"\n" + end + b"\n"
    return stdout, stderr


def test_the_command_runs_framed_with_a_fresh_nonce():
    one, two = FramedCommand("sha256sum -- /w/a"), FramedCommand("sha256sum -- /w/a")
    assert one.nonce != two.nonce
    assert "( sha256sum -- /w/a\n)" in one.text and one.nonce in one.text


def test_the_hash_is_read_between_the_markers_whatever_the_shell_printed():
    command = FramedCommand("sha256sum -- /w/a")
    stdout, stderr = frame(command, f"{DIGEST}  /w/a\n".encode())
    output = read_result("site1", command, stdout, stderr, 0, action="hash", path="/w/a")
    assert output == f"{DIGEST}  /w/a\n"


def test_a_failing_command_reports_its_own_stderr_without_the_noise():
    command = FramedCommand("sha256sum -- /w/a")
    stdout, stderr = frame(command, b"", b"sha256sum: /w/a: Permission denied", status=1)
    with pytest.raises(TransferError) as caught:
        read_result("site1", command, stdout, stderr, 1, action="hash", path="/w/a")
    assert str(caught.value) == (
        "facility site1: cannot hash /w/a (exit 1): sha256sum: /w/a: Permission denied"
    )
    assert not caught.value.retryable
    # without check (the tool probe) a non-zero exit is fine
    assert (
        read_result("site1", command, stdout, stderr, 1, action="probe", path="/w", check=False)
        == ""
    )


def test_a_command_that_never_started_shows_what_the_shell_printed():
    command = FramedCommand("true")
    with pytest.raises(
        TransferError, match=r"exited 127, and the command did not start .*'csh: syntax"
    ):
        read_result("site1", command, b"csh: syntax error\n", b"", 127, action="hash", path="/w/a")


def test_a_command_cut_by_a_lost_link_is_retried():
    command = FramedCommand("sha256sum -- /w/a")
    stdout, _ = frame(command, b"")
    with pytest.raises(RetryableFailure, match="ended without status"):
        read_result("site1", command, stdout[:40], b"", None, "KILL", action="hash", path="/w/a")


def test_noise_is_logged_once_per_facility_at_debug(caplog, monkeypatch):
    monkeypatch.setattr(remote_exec, "_noisy_facilities", set())
    caplog.set_level(logging.DEBUG, logger=remote_exec.__name__)
    for _ in range(3):
        command = FramedCommand("true")
        read_result("noisy1", command, *frame(command, b""), 0, action="x", path="/")
    command = FramedCommand("true")
    read_result("noisy2", command, *frame(command, b""), 0, action="x", path="/")
    records = [r for r in caplog.records if "login shell prints" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG]
    assert (
        "noisy1" in records[0].getMessage() and "'Welcome to login01\\n" in records[0].getMessage()
    )


def test_a_timeout_names_the_facility_the_command_and_the_limit():
    assert timeout_message("site1", "openssl dgst -sha256 -r '/w/model.safetensors'", 1800.0) == (
        "the remote command `openssl dgst -sha256 -r '/w/model.safetensors'` on facility site1 "
        "did not finish within the command_timeout of 1800 s"
    )
    long = timeout_message("site1", "python3 -c '" + "A" * 500 + "'", 2.5)
    assert "..." in long and "2.5 s" in long and len(long) < 250


def test_the_noisy_sftp_message_says_what_was_seen_why_and_the_fix():
    message = noisy_sftp_message(BANNER, asyncssh.SFTPBadMessage("Max packet size exceeded"))
    assert "SFTPBadMessage: Max packet size exceeded" in message
    assert "First bytes it prints: 'Welcome to login01\\nQuota" in message
    assert "prints on stdout even for non-interactive sessions" in message
    assert "`[[ $- == *i* ]] || return` at the top of ~/.bashrc" in message
    assert "`internal-sftp`" in message


class FakeConnection:
    """Opens, fails to start SFTP the way a noisy sftp-server does, and runs `true` with noise."""

    def __init__(self, stdout: bytes):
        self.stdout = stdout
        self.runs: list[str] = []
        self.closed = False
        self.opened = 0

    async def start_sftp_client(self):
        raise asyncssh.SFTPBadMessage("Max packet size exceeded")

    async def run(self, command, **kwargs):
        self.runs.append(command)
        return SimpleNamespace(stdout=self.stdout, stderr=b"", exit_status=0, exit_signal=None)

    def close(self):
        self.closed = True


class OneWay(TransferRun):
    direction = "push"

    async def attempt(self, session):  # pragma: no cover - never reached
        raise AssertionError("the session cannot open")


def run_against(conn: FakeConnection, monkeypatch) -> None:
    async def fake_open(target, options):
        conn.opened += 1
        return conn

    monkeypatch.setattr(session, "open_connection", fake_open)
    run = OneWay(
        facility=RemoteFacility(name="site1", conn_id="facility_site1", workdir="/w"),
        target=SimpleNamespace(conn_id="facility_site1"),
        options=TransferOptions(backoff=0.01, retries=2, channels=1),
        local_dir=Path("/nonexistent"),
        remote_dir="/w/m",
    )
    asyncio.run(run.run())


def test_sftp_broken_by_shell_output_fails_once_with_the_fix(monkeypatch):
    conn = FakeConnection(BANNER)
    with pytest.raises(TransferError) as caught:
        run_against(conn, monkeypatch)
    assert not caught.value.retryable
    assert str(caught.value).startswith("facility site1: SFTP cannot start")
    assert "First bytes it prints: 'Welcome to login01" in str(caught.value)
    assert conn.runs == ["true"] and conn.closed
    assert conn.opened == 1  # one attempt, no retries


def test_a_bad_sftp_message_with_a_quiet_shell_is_still_retried(monkeypatch):
    conn = FakeConnection(b"")
    with pytest.raises(
        TransferError, match="gave up after 3 failed attempts; last: cannot start SFTP"
    ) as caught:
        run_against(conn, monkeypatch)
    assert caught.value.retryable and conn.opened == 3 and conn.runs == ["true"] * 3
