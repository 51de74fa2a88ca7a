"""``SlurmClient`` against a login shell that prints around every command, on literal outputs
and on a real local ``bash``: what the command printed is told apart from the noise, the noise
is logged once per facility at debug level, an unreadable or late answer is a retryable error
naming the facility and the command, and a lost sbatch answer is ``SlurmSubmitUnknown``.

Unit level: fake SSH connections (``fake_shell``) or a local ``bash -c``; nothing is started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import asyncssh
import pytest
from xffl_airflow.hooks import slurm_client as slurm_hook
from xffl_airflow.hooks.slurm import SlurmClient, SlurmCommandError, SlurmSubmitUnknown
from xffl_airflow.slurm.commands import LogRead
from xffl_airflow.slurm.login import FacilityLogin

from tests.plugins.xffl_airflow.hooks.fake_shell import answer, inner, unwrap

BANNER = b"Welcome to login01\nQuota: 91% used\n"
TITLE = b"\x1b]0;user@login01\x07"  # a terminal-title escape, no newline


class Literal:
    """A connection whose login shell prints ``before``/``after``/``err_before`` around the
    command, which answers ``stdout``/``stderr``/``returncode``."""

    def __init__(self, stdout: bytes = b"", stderr: bytes = b"", returncode: int = 0, **noise):
        self.stdout, self.stderr, self.returncode, self.noise = stdout, stderr, returncode, noise
        self.commands: list[str] = []

    async def run(self, command, *, input, encoding, check, timeout):
        command, nonce = unwrap(command)
        self.commands.append(command)
        return answer(nonce, self.stdout, self.stderr, self.returncode, **self.noise)


def client(connection, conn_id: str = "noisy", **login) -> SlurmClient:
    return SlurmClient(conn_id, connection, login=FacilityLogin.of(login.get("login_preamble"), login.get("slurm_bin")) if login else None)


@pytest.mark.parametrize(
    "noise",
    [
        {"before": BANNER, "after": b"logout\n"},
        {"before": b"no trailing newline"},
        {"before": TITLE},
        {"err_before": b"module: loaded\npartial"},
        {},
    ],
    ids=["banner", "no-newline", "escape", "stderr", "quiet"],
)
def test_sbatch_and_workdir_read_through_the_noise(noise):
    submit = Literal(b"4242;faca\n", **noise)
    assert asyncio.run(
        client(submit).submit("#!/bin/sh\n", workdir="/w", script_name="a.sbatch")
    ) == (
        "4242",
        "faca",
    )
    assert inner(submit.commands[0]).endswith("sbatch --parsable -- /w/a.sbatch")
    workdir = Literal(b"/home/u/xffl\n", **noise)
    assert asyncio.run(client(workdir).resolve_workdir("xffl")) == "/home/u/xffl"


def test_the_noise_is_logged_once_per_facility_at_debug_level(caplog):
    caplog.set_level(logging.DEBUG, logger=slurm_hook.__name__)
    slurm_hook._NOISY.discard("loud")
    loud = client(Literal(b"/w\n", before=TITLE), "loud")
    for _ in range(3):
        asyncio.run(loud.resolve_workdir("/w"))
    asyncio.run(client(Literal(b"/w\n", before=TITLE), "loud").resolve_workdir("/w"))
    noted = [r for r in caplog.records if "prints around our commands" in r.getMessage()]
    assert len(noted) == 1 and noted[0].levelno == logging.DEBUG
    assert "\\x1b]0;user@login01\\x07" in noted[0].getMessage()


def test_the_framed_exit_status_counts_not_the_channels():
    refused = Literal(b"", b"sbatch: error: invalid partition specified: nope\n", 1)
    with pytest.raises(SlurmCommandError, match="invalid partition") as caught:
        asyncio.run(client(refused).submit("x", workdir="/w", script_name="a.sbatch"))
    assert not caught.value.retryable and not isinstance(caught.value, SlurmSubmitUnknown)


def test_a_garbled_sbatch_answer_may_have_submitted_the_job():
    garbled = Literal(b"\x1b[?1034hSubmitted! have a nice day\n", returncode=0)
    with pytest.raises(SlurmSubmitUnknown, match="printed no job id.*probably submitted") as caught:
        asyncio.run(client(garbled).submit("x", workdir="/w", script_name="a.sbatch"))
    assert caught.value.retryable and "'noisy'" in str(caught.value)


class Unframed:
    """A shell whose answer has no frame: the command never started, or its output was cut."""

    def __init__(self, stdout: bytes, stderr: bytes = b"", returncode: int | None = 127):
        self.stdout, self.stderr, self.returncode = stdout, stderr, returncode

    async def run(self, command, *, input, encoding, check, timeout):
        _, nonce = unwrap(command)
        cut = self.stdout.replace(b"NONCE", nonce.encode())
        return SimpleNamespace(returncode=self.returncode, stdout=cut, stderr=self.stderr)


def test_an_answer_without_its_frame_is_retryable_and_shows_the_first_bytes():
    never = Unframed(b"-bash: module: command not found\n", b"bash: line 1: syntax error\n")
    with pytest.raises(SlurmCommandError) as caught:
        asyncio.run(client(never, "site9").run("squeue -h", what="squeue poll"))
    message = str(caught.value)
    assert caught.value.retryable and message.startswith("facility connection 'site9': squeue poll")
    assert "did not start" in message and "'-bash: module: command not found\\n'" in message
    assert "stderr: 'bash: line 1: syntax error\\n'" in message
    cut = Unframed(b"\n@@xffl-frame:NONCE:begin\n12", returncode=None)
    with pytest.raises(SlurmCommandError, match=r"cut before its end marker.*stdout: '\\n@@xffl"):
        asyncio.run(client(cut).run("squeue -h"))


def test_a_lost_sbatch_answer_is_submit_unknown():
    cut = Unframed(b"\n@@xffl-frame:NONCE:begin\n", returncode=None)
    with pytest.raises(SlurmSubmitUnknown, match="sbatch gave no readable answer.*may have been"):
        asyncio.run(client(cut).submit("x", workdir="/w", script_name="a.sbatch"))


class Slow:
    def __init__(self, error: BaseException):
        self.error = error

    async def run(self, command, *, input, encoding, check, timeout):
        raise self.error


@pytest.mark.parametrize(
    "error", [TimeoutError(), asyncssh.TimeoutError(None, "cmd", None, None, None, 0, b"", b"")]
)
def test_a_timeout_names_the_facility_the_command_and_the_limit(error):
    slow = SlurmClient("site3", Slow(error), command_timeout=7)
    with pytest.raises(SlurmCommandError) as caught:
        asyncio.run(slow.poll(["42"]))
    assert str(caught.value) == (
        "facility connection 'site3': squeue/log poll timed out after 7 s (command_timeout)"
    )
    assert caught.value.retryable
    with pytest.raises(SlurmSubmitUnknown, match="'site3': sbatch timed out after 7 s.*may have"):
        asyncio.run(slow.submit("x", workdir="/w", script_name="a.sbatch"))
    with pytest.raises(SlurmCommandError, match="'site3': scancel timed out after 2.5 s"):
        asyncio.run(SlurmClient("site3", Slow(error), command_timeout=2.5).cancel("42"))


# -- a real local shell ----------------------------------------------------------------------


class LocalShell:
    """Runs the framed command in a local ``bash -c`` after ``startup`` (the login shell's
    start-up files), with ``path`` as PATH, as sshd would run it for the facility user."""

    def __init__(self, startup: str, path: str):
        self.startup, self.path = startup, path

    async def run(self, command, *, input, encoding, check, timeout):
        process = await asyncio.create_subprocess_exec(
            shutil.which("bash"), "-c", f"{self.startup}\n{command}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": self.path, "HOME": "/tmp"},
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout)
        return SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)


def fake_slurm(folder: Path) -> Path:
    """A folder of fake Slurm commands that need ``FAKE_SLURM_CONF`` (set by ``module load``)."""
    folder.mkdir()
    scripts = {
        "squeue": 'printf "42\\0374242\\037RUNNING\\037None\\0370:0\\037'
        "2026-01-01T00:00:00\\0372026-01-01T00:00:01\\037N/A\\037faca\\037train\\037"
        '/w/a.log\\037(null)\\037\\n"',
        "sbatch": 'cat >/dev/null; echo "777;faca"',
    }
    for name, body in scripts.items():
        path = folder / name
        path.write_text(
            "#!/bin/sh\n"
            '[ -n "$FAKE_SLURM_CONF" ] || { echo "slurm_load_partitions: Unable to contact '
            'slurm controller" >&2; exit 1; }\n' + body + "\n"
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def plain_tools(folder: Path) -> str:
    """A PATH with the tools our commands use and no Slurm (a login node before its module)."""
    folder.mkdir()
    for tool in ("sh", "mkdir", "mktemp", "cat", "mv", "date", "stat", "tail", "head", "base64"):
        (folder / tool).symlink_to(shutil.which(tool))
    return str(folder)


STARTUP = (
    "printf 'Welcome\\nQuota 91%%'; printf '\\033]0;login01\\007'; echo 'module notice' >&2\n"
    'module() { echo "module: loading $2"; export FAKE_SLURM_CONF=/etc/slurm/fake.conf; }'
)


def test_a_real_shell_with_noise_needs_its_login_preamble_and_slurm_bin(tmp_path, caplog):
    bin_dir = fake_slurm(tmp_path / "slurm-bin")
    shell = LocalShell(STARTUP, plain_tools(tmp_path / "tools"))
    both = client(shell, login_preamble=["module load slurm", "export X=1"], slurm_bin=str(bin_dir))
    answer_ = asyncio.run(both.poll(["42"], [LogRead("k", str(tmp_path / "none.log"))]))
    assert answer_.problems == [] and answer_.jobs["42"].state == "RUNNING"
    assert asyncio.run(
        both.submit("#!/bin/sh\n", workdir=str(tmp_path), script_name="a.sbatch")
    ) == (
        "777",
        "faca",
    )
    assert (tmp_path / "a.sbatch").read_text() == "#!/bin/sh\n"  # stdin reached the command
    without_preamble = client(shell, slurm_bin=str(bin_dir))
    answer_ = asyncio.run(without_preamble.poll(["42"]))
    assert answer_.problems and "Unable to contact slurm controller" in answer_.problems[0]
    without_bin = client(shell, login_preamble=["module load slurm"])
    with pytest.raises(SlurmCommandError, match="sbatch refused the job: .*not found"):
        asyncio.run(without_bin.submit("x", workdir=str(tmp_path), script_name="b.sbatch"))


def test_a_real_shell_keeps_the_exit_status_and_output_without_newline(tmp_path):
    shell = LocalShell(STARTUP, os.environ["PATH"])
    result = asyncio.run(client(shell).run("printf 'no newline'; echo err >&2; exit 3"))
    assert (result.returncode, result.stdout, result.stderr) == (3, b"no newline", b"err\n")
