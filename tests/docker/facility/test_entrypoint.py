"""The facility image's entrypoint, run natively: ``docker/facility/entrypoint.sh`` with the keys
``docker/make-keys.sh`` makes, reached with the Airflow connection make-keys.sh wrote.

No Docker engine runs here, so the container's own start command runs on this machine instead,
with its paths, user and ports moved by the environment variables it reads (a folder under
/tmp, a user of its own, free loopback ports; the connection's host and port are moved to
match). It starts, through lib.sh: one munged, a slurmctld, a slurmd and an sshd; it stops
them itself, through ``docker/facility/down``, on SIGTERM or when one of them dies. Each test
checks that every process of it is gone, by PID.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.docker.deployment_files import read_env_file
from xffl_testbed.airflow_instance import free_port
from xffl_testbed.processes import alive, terminate, with_descendants

pytestmark = pytest.mark.usefixtures("starts_facilities")


DOCKER = Path(__file__).resolve().parents[3] / "docker"


class Entrypoint:
    """One run of entrypoint.sh in a folder of its own."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.user = f"xffl-ep-{secrets.token_hex(3)}"
        self.run_dir = root / "run"
        self.home = root / "home"
        self.keys = root / "deploy" / "keys"
        self.ssh_port = free_port()
        made = subprocess.run(
            [str(DOCKER / "make-keys.sh"), "--out", str(self.keys), name, "spare"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        self.env = {
            **os.environ,
            "FACILITY_NAME": name,
            "FACILITY_USER": self.user,
            "FACILITY_HOME": str(self.home),
            "FACILITY_KEYS": str(self.keys / name),
            "XFFL_RUN_DIR": str(self.run_dir),
            "SSH_PORT": str(self.ssh_port),
            "SSH_LISTEN": "127.0.0.1",
            "SLURMCTLD_PORT": str(free_port()),
            "SLURMD_PORT": str(free_port()),
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        with open(self.root / "entrypoint.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(DOCKER / "facility" / "entrypoint.sh")],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        state = self.run_dir / "state"
        deadline = time.monotonic() + timeout
        while not (state.exists() and state.read_text().strip() == "up"):
            assert self.process.poll() is None, (
                f"entrypoint exited {self.process.returncode}:\n{self.log()}"
            )
            assert time.monotonic() < deadline, f"facility not up after {timeout} s:\n{self.log()}"
            time.sleep(0.3)

    def log(self) -> str:
        return (self.root / "entrypoint.log").read_text(errors="replace")[-3000:]

    def connection(self, *, host_key_of: str | None = None) -> str:
        """The Airflow connection make-keys.sh wrote, moved to this machine's loopback port."""
        env = read_env_file(self.keys / "airflow.env")
        conn = json.loads(env[f"AIRFLOW_CONN_FACILITY_{self.name.upper()}"])
        assert (conn["host"], conn["port"], conn["login"]) == (self.name, 22, "xffl")
        conn.update(host="127.0.0.1", port=self.ssh_port, login=self.user)
        if host_key_of:
            other = json.loads(env[f"AIRFLOW_CONN_FACILITY_{host_key_of.upper()}"])
            conn["extra"]["host_key"] = other["extra"]["host_key"]
        return json.dumps(conn)

    def pids(self) -> set[int]:
        return with_descendants([self.process.pid])

    def daemon_pid(self, daemon: str) -> int:
        return int((self.run_dir / self.name / "pids" / f"{daemon}.pid").read_text())


@pytest.fixture
def entrypoint():
    root = Path(tempfile.mkdtemp(prefix="xffl-entrypoint.", dir="/tmp"))
    root.chmod(0o755)  # the facility user reaches its home below
    run = Entrypoint(root, "edge")
    try:
        yield run
    finally:
        if run.process is not None and run.process.poll() is None:
            terminate([run.process.pid], grace=20)
        if (run.run_dir / "token").exists():
            subprocess.run(
                [str(DOCKER / "facility" / "down"), str(run.run_dir)],
                capture_output=True,
                timeout=120,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


def wait_for_job(hook, client, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, out, _ = hook.exec_ssh_client_command(
            client, f"scontrol show -o job {job_id}", False, None
        )
        state = out.decode().split("JobState=")[1].split()[0]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def test_the_entrypoint_serves_slurm_over_the_pinned_connection_and_stops_on_sigterm(
    entrypoint, monkeypatch
):
    from airflow.providers.ssh.hooks.ssh import SSHHook

    entrypoint.start()
    started = entrypoint.pids()
    assert {entrypoint.daemon_pid(d) for d in ("slurmctld", "slurmd", "sshd")} <= started
    # The host key sshd serves is the one make-keys.sh made, not one made at start.
    served = (entrypoint.run_dir / "edge" / "ssh_host_ed25519_key").read_bytes()
    assert served == (entrypoint.keys / "edge" / "ssh_host_ed25519_key").read_bytes()

    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_EDGE", entrypoint.connection())
    hook = SSHHook(ssh_conn_id="facility_edge")
    assert hook.no_host_key_check is False
    with hook.get_conn() as client:
        code, out, err = hook.exec_ssh_client_command(
            client,
            "cd xffl && sbatch --parsable --output=whoami-%j.out --wrap 'id -un; echo cluster=$SLURM_CLUSTER_NAME'",
            False,
            None,
        )
        assert code == 0, err
        job_id = out.decode().strip()
        assert wait_for_job(hook, client, job_id) == "COMPLETED"
    output = (entrypoint.home / "xffl" / f"whoami-{job_id}.out").read_text().split()
    assert output == [entrypoint.user, "cluster=edge"]

    # Pinned to another facility's host key, the same connection is refused.
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_EDGE", entrypoint.connection(host_key_of="spare"))
    with pytest.raises(Exception, match="(?i)host key|not match|BadHostKey"):
        SSHHook(ssh_conn_id="facility_edge").get_conn()

    entrypoint.process.send_signal(signal.SIGTERM)
    assert entrypoint.process.wait(timeout=60) == 0, entrypoint.log()
    assert [pid for pid in started if alive(pid)] == []
    assert (entrypoint.run_dir / "state").read_text().strip() == "down"
    with pytest.raises(KeyError):
        pwd.getpwnam(entrypoint.user)


def test_the_entrypoint_stops_everything_and_fails_when_a_daemon_dies(entrypoint):
    entrypoint.start()
    started = entrypoint.pids()
    os.kill(entrypoint.daemon_pid("slurmd"), signal.SIGKILL)
    assert entrypoint.process.wait(timeout=60) == 1, entrypoint.log()
    assert "slurmd of edge ended" in entrypoint.log()
    assert [pid for pid in started if alive(pid)] == []


def test_the_entrypoint_refuses_to_start_without_keys(entrypoint):
    shutil.rmtree(entrypoint.keys / "edge")
    entrypoint.env["FACILITY_KEYS"] = str(entrypoint.keys / "edge")
    result = subprocess.run(
        [str(DOCKER / "facility" / "entrypoint.sh")],
        env=entrypoint.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "client_key.pub: run docker/make-keys.sh" in result.stderr
    assert not (entrypoint.run_dir / "token").exists()
