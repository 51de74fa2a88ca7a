"""Transfers to facilities whose login shell prints on every start, as real login nodes do.

Starts: the session's ``testbed`` (site1, whose sshd uses ``internal-sftp``: SFTP runs no shell)
and, for this module, one more facility ``sftpsrv`` (``docker/facility/up --sftp-server
/usr/lib/openssh/sftp-server``: the SFTP server starts through the user's shell), stopped by
``down --purge`` at the end of the module. Each test writes a ``~/.bashrc`` for the facility
user (bash reads it for the commands sshd runs) and puts back what was there afterwards: the
session's facilities are shared with other tests. Each test works in a folder of its own under
the workdir and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from xffl_airflow.ssh import get_target
from xffl_airflow.transfer import RemoteFacility, TransferError, pull, push
from xffl_airflow.transfer.errors import RetryableFailure
from xffl_airflow.transfer.options import TransferOptions
from xffl_airflow.transfer.session import FacilitySession

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
MIB = 1 << 20

# What login nodes print; each one a ~/.bashrc.
BANNER = (
    "echo '*** Welcome to login01 ***'\n"
    "echo 'Quota: 91% of /home used'\n"
    "echo\n"
    "echo 'Modules: gcc/12 loaded'\n"
)
NO_NEWLINE = "printf 'Last login: Mon from 10.0.0.1'\n"
TITLE = "printf '\\033]0;%s@login01\\007' \"$USER\"\n"
STDERR_ONLY = "echo 'module: slurm loaded' >&2\nprintf 'quota warning, no newline' >&2\n"
ALL = BANNER + NO_NEWLINE + TITLE + STDERR_ONLY
STDOUT_QUIRKS = {"banner": BANNER, "no_newline": NO_NEWLINE, "title": TITLE, "all": ALL}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small model-like folder: a file of several segments, a config, a nested and an empty file."""
    folder = tmp_path_factory.mktemp("noisy-model") / "global"
    (folder / "metrics").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(20 * MIB + 12345))
    (folder / "config.json").write_text(json.dumps({"n_layer": 2}))
    (folder / "metrics" / "round.json").write_text(json.dumps({"round": 1}))
    (folder / "metrics" / "empty.txt").touch()
    return folder


@pytest.fixture(scope="module")
def sftp_server_bed(starts_facilities):
    """One more facility whose sshd runs OpenSSH's sftp-server through the user's shell."""
    from xffl_testbed.facilities import SCRIPTS, Testbed

    if not os.access(SFTP_SERVER, os.X_OK):
        pytest.fail(f"no {SFTP_SERVER} (Debian package openssh-server)")
    run_dir = tempfile.mkdtemp(prefix="xffl-testbed.", dir="/tmp")
    argv = [str(SCRIPTS / "up"), "1", "--run-dir", run_dir, "--names", "sftpsrv"]
    done = subprocess.run(
        [*argv, "--sftp-server", SFTP_SERVER], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(f"up --sftp-server failed:\n{done.stderr}{done.stdout}")
    bed = Testbed(run_dir)
    try:
        yield bed.facility("sftpsrv")
    finally:
        bed.down(purge=True)


class Quirk:
    """Writes the facility user's ~/.bashrc and puts the old one back on ``restore``."""

    def __init__(self, bed):
        self.bed = bed
        self.path = Path(bed.home) / ".bashrc"
        self.saved = self.path.read_bytes() if self.path.exists() else None

    def install(self, text: str) -> None:
        self.path.write_text(text)
        user = pwd.getpwnam(self.bed.user)
        os.chown(self.path, user.pw_uid, user.pw_gid)

    def restore(self) -> None:
        if self.saved is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self.saved)


def facility_for(bed, monkeypatch) -> RemoteFacility:
    monkeypatch.setenv(f"AIRFLOW_CONN_{bed.conn_id.upper()}", json.dumps(bed.connection))
    return RemoteFacility(name=bed.name, conn_id=bed.conn_id, workdir=bed.workdir)


@pytest.fixture
def on_site1(testbed, monkeypatch):
    bed = testbed.facility("site1")
    quirk = Quirk(bed)
    name = f"noisy-{uuid.uuid4().hex[:8]}"
    yield bed, facility_for(bed, monkeypatch), quirk, name
    quirk.restore()
    shutil.rmtree(Path(bed.workdir) / name, ignore_errors=True)


@pytest.fixture
def on_sftp_server(sftp_server_bed, monkeypatch):
    bed = sftp_server_bed
    quirk = Quirk(bed)
    name = f"noisy-{uuid.uuid4().hex[:8]}"
    yield bed, facility_for(bed, monkeypatch), quirk, name
    quirk.restore()
    shutil.rmtree(Path(bed.workdir) / name, ignore_errors=True)


def round_trip(facility: RemoteFacility, model: Path, name: str, back: Path) -> None:
    """Push, then pull back; both reports' hashes are the local files' own."""
    expected = {
        p.relative_to(model).as_posix(): sha256_of(p) for p in model.rglob("*") if p.is_file()
    }
    pushed = push(model, facility, name, retries=0)
    assert pushed.files == expected and pushed.retries == 0
    remote = Path(facility.workdir) / name
    assert {k: sha256_of(remote / k) for k in expected} == expected
    pulled = pull(facility, name, back, retries=0)
    assert pulled.files == expected and pulled.retries == 0
    assert {k: sha256_of(back / k) for k in expected} == expected


@pytest.mark.parametrize("quirk_name", [*STDOUT_QUIRKS, "stderr"])
def test_internal_sftp_push_and_pull_survive_a_noisy_shell(
    on_site1, model_dir, tmp_path, quirk_name
):
    bed, facility, quirk, name = on_site1
    quirk.install({**STDOUT_QUIRKS, "stderr": STDERR_ONLY}[quirk_name])
    seen = bed.ssh("true")
    assert seen.stdout or seen.stderr  # bash read ~/.bashrc for the command sshd ran
    round_trip(facility, model_dir, name, tmp_path / "back")
    # unchanged files are recognised by their remote hashes, through the noise
    again = push(model_dir, facility, name, retries=0)
    assert again.files_skipped == len(again.files) and again.bytes_sent == 0


def session_call(bed, facility: RemoteFacility, call, **tuning):
    async def go():
        options = TransferOptions(**tuning)
        session = await FacilitySession.open(facility, get_target(facility.conn_id), options)
        try:
            return await call(session)
        finally:
            await session.close()

    return asyncio.run(go())


def test_remote_commands_read_the_same_with_and_without_noise(on_site1, model_dir):
    bed, facility, quirk, name = on_site1
    remote = Path(bed.workdir) / name
    remote.mkdir()
    shutil.copy(model_dir / "model.safetensors", remote / "m")
    user = pwd.getpwnam(bed.user)
    os.chown(remote, user.pw_uid, user.pw_gid)
    os.chown(remote / "m", user.pw_uid, user.pw_gid)
    path, length = str(remote / "m"), (remote / "m").stat().st_size

    async def everything(session):
        return (
            await session.hash_tools(),
            await session.sha256(path),
            await session.segment_hashes(path, length),
            await session.run("printf 'a\\nb'; echo err >&2", action="print", path=path),
        )

    quiet = session_call(bed, facility, everything)
    quirk.install(ALL)
    noisy = session_call(bed, facility, everything)
    assert noisy == quiet
    assert quiet[0].python3 and quiet[1] == sha256_of(remote / "m") and quiet[3] == "a\nb"
    assert len(quiet[2]) == -(-length // TransferOptions().segment_size)


def test_a_command_timeout_names_the_facility_the_command_and_the_limit(on_site1):
    bed, facility, quirk, name = on_site1
    quirk.install(BANNER)

    async def slow(session):
        return await session.run("sleep 30", action="wait on", path=bed.workdir)

    with pytest.raises(RetryableFailure) as caught:
        session_call(bed, facility, slow, command_timeout=1.5)
    assert caught.value.message == (
        "the remote command `sleep 30` on facility site1 did not finish "
        "within the command_timeout of 1.5 s"
    )


def test_sftp_server_works_with_a_quiet_or_stderr_only_shell(on_sftp_server, model_dir, tmp_path):
    bed, facility, quirk, name = on_sftp_server
    round_trip(facility, model_dir, name, tmp_path / "quiet")
    quirk.install(STDERR_ONLY)
    assert bed.ssh("true").stderr.startswith("module: slurm loaded")
    round_trip(facility, model_dir, f"{name}-stderr", tmp_path / "stderr")
    shutil.rmtree(Path(bed.workdir) / f"{name}-stderr", ignore_errors=True)


@pytest.mark.parametrize("quirk_name", ["banner", "title"])
def test_sftp_server_behind_stdout_noise_fails_once_saying_why_and_how_to_fix(
    on_sftp_server, model_dir, tmp_path, quirk_name
):
    bed, facility, quirk, name = on_sftp_server
    quirk.install(STDOUT_QUIRKS[quirk_name])
    for call in (
        lambda: push(model_dir, facility, name, retries=5, backoff=5.0),
        lambda: pull(facility, ".", tmp_path / "back", retries=5, backoff=5.0),
    ):
        started = time.monotonic()
        with pytest.raises(TransferError) as caught:
            call()
        assert time.monotonic() - started < 5.0  # the first backoff alone would take longer
        message = str(caught.value)
        assert not caught.value.retryable
        assert message.startswith("facility sftpsrv: SFTP cannot start (SFTPBadMessage")
        assert "prints on stdout even for non-interactive sessions" in message
        assert "`[[ $- == *i* ]] || return` at the top of ~/.bashrc" in message
        assert "`internal-sftp`" in message
        first = "'*** Welcome to login01 ***\\n" if quirk_name == "banner" else "'\\x1b]0;"
        assert f"First bytes it prints: {first}" in message
