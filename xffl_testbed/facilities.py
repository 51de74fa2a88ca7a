"""A thin Python wrapper of ``docker/facility/up`` and ``down`` for tests and the demo.

``Testbed.up(2)`` starts two local facilities (Slurm behind sshd, each with its own user);
``testbed.down()`` stops every process they started, by PID. The scripts do the work; this
module only runs them and reads the ``facilities.json`` they write.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "docker" / "facility"


def facility_python() -> str:
    """The facility-side Python (xffl_tasks, no Airflow) that ``make`` installs.

    ``XFFL_FACILITY_PYTHON`` when set (``make`` exports it), else where the Makefile puts it:
    ``.venv-facility`` in a checkout the facility users can read, else
    ``/var/tmp/xffl-airflow-facility-<hash of the checkout's path>``.
    """
    if os.environ.get("XFFL_FACILITY_PYTHON"):
        return os.environ["XFFL_FACILITY_PYTHON"]
    in_checkout = REPO / ".venv-facility" / "bin" / "python"
    if in_checkout.exists():
        return str(in_checkout)
    digest = hashlib.md5(f"{REPO}\n".encode(), usedforsecurity=False).hexdigest()[:10]
    return f"/var/tmp/xffl-airflow-facility-{digest}/bin/python"


class TestbedError(RuntimeError):
    """A facility script failed; the message carries its output."""


@dataclass(frozen=True)
class Facility:
    """One local facility as ``up`` described it in ``facilities.json``."""

    name: str
    conn_id: str
    host: str
    ssh_port: int
    user: str
    client_key: str
    host_key: str
    workdir: str
    home: str
    slurm_conf: str
    slurmctld_port: int
    slurmd_port: int
    partition: str
    facility_dir: str
    python: str | None
    run_dir: str

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.ssh_port} {self.host_key}"

    @property
    def connection(self) -> dict:
        """The Airflow connection (JSON form) that reaches this facility, host key pinned."""
        return {
            "conn_type": "ssh",
            "host": self.host,
            "port": self.ssh_port,
            "login": self.user,
            "extra": {
                "key_file": self.client_key,
                "host_key": self.host_key,
                "no_host_key_check": False,
                "conn_timeout": 10,
            },
        }

    def known_hosts_file(self) -> str:
        path = Path(self.facility_dir) / "known_hosts"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(self.known_hosts_line + "\n")
            tmp.replace(path)
        return str(path)

    def ssh_argv(self, command: str, *, user: str | None = None, key: str | None = None) -> list[str]:
        """``ssh`` with strict host-key checking against this run's host key."""
        return [
            "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_file()}", "-o", "ConnectTimeout=10",
            "-i", key or self.client_key, "-p", str(self.ssh_port),
            f"{user or self.user}@{self.host}", command,
        ]  # fmt: skip

    def ssh(self, command: str, *, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Runs ``command`` in the facility user's login shell over ssh."""
        result = subprocess.run(self.ssh_argv(command, **kwargs), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise TestbedError(f"ssh to {self.name} failed ({result.returncode}): {command}\n{result.stderr}")
        return result

    def slurm_admin(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs a Slurm command as root against this facility's cluster (e.g. ``scontrol``)."""
        env = dict(os.environ, SLURM_CONF=self.slurm_conf)
        result = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=60)
        if check and result.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} on {self.name} failed: {result.stderr}")
        return result

    def stop_sshd(self) -> None:
        _run_script("sshd-ctl", self.run_dir, self.name, "stop")

    def start_sshd(self) -> None:
        _run_script("sshd-ctl", self.run_dir, self.name, "start")

    def stop_slurmctld(self, *, crash: bool = False) -> None:
        """Stops this facility's slurmctld (SIGTERM; SIGKILL with ``crash``); jobs keep running."""
        _run_script("slurmctld-ctl", self.run_dir, self.name, "kill" if crash else "stop")

    def start_slurmctld(self) -> None:
        """Starts this facility's slurmctld again from its saved state."""
        _run_script("slurmctld-ctl", self.run_dir, self.name, "start")

    def daemon_pid(self, daemon: str) -> int:
        return int((Path(self.facility_dir) / "pids" / f"{daemon}.pid").read_text())

    # -- access as centres grant it (docker/facility/access) ---------------------------

    def enable_certificates(self, *, validity: str = "-1m:+1h", cert_only: bool = False) -> str:
        """A user CA trusted by this facility's sshd; signs the client key. Returns the cert's path.

        ``cert_only``: the plain client key is no longer authorized (only certificates log in).
        """
        args = ["--validity", validity, *(["--cert-only"] if cert_only else [])]
        return _run_script("access", self.run_dir, self.name, "ca", *args).strip().splitlines()[-1]

    def sign_certificate(self, validity: str = "-1m:+1h") -> str:
        """(Re)signs the client key (renewal: the file is replaced atomically); returns its path."""
        out = _run_script("access", self.run_dir, self.name, "sign", "--validity", validity)
        return out.strip().splitlines()[-1]

    def start_bastion(self) -> Bastion:
        """Starts a bastion sshd forwarding only to this facility's sshd (stopped by ``down``)."""
        path = _run_script("access", self.run_dir, self.name, "bastion").strip().splitlines()[-1]
        return Bastion(**json.loads(Path(path).read_text()), facility=self.name,
                       pid_file=str(Path(self.facility_dir) / "pids" / "bastion-sshd.pid"))  # fmt: skip


@dataclass(frozen=True)
class Bastion:
    """A jump host in front of one facility, as ``access ... bastion`` described it."""

    facility: str
    host: str
    ssh_port: int
    user: str
    client_key: str
    host_key: str
    permit_open: str
    pid_file: str

    @property
    def pid(self) -> int:
        return int(Path(self.pid_file).read_text())

    @property
    def connection(self) -> dict:
        """The Airflow connection (JSON form) of this jump host, host key pinned."""
        return {
            "conn_type": "ssh",
            "host": self.host,
            "port": self.ssh_port,
            "login": self.user,
            "extra": {"key_file": self.client_key, "host_key": self.host_key, "conn_timeout": 10},
        }


def _run_script(script: str, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise TestbedError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result.stdout


class Testbed:
    """Local facilities brought up by ``docker/facility/up`` in one run directory."""

    __test__ = False  # not a pytest class

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        described = json.loads((self.run_dir / "facilities.json").read_text())
        self.facilities = [Facility(**f, run_dir=str(self.run_dir)) for f in described["facilities"]]

    @classmethod
    def up(
        cls,
        count: int,
        *,
        names: list[str] | None = None,
        run_dir: str | Path | None = None,
        min_job_age: int = 300,
        python: str | None = None,
        node_cpus: int | None = None,
        parallel: int | None = None,
    ) -> Testbed:
        """Brings up ``count`` facilities; ``parallel``: how many start their daemons at once
        (``up``'s default when None; 1 starts them one at a time)."""
        if run_dir is None:
            # Under /tmp, not pytest's private tmp: the facility users must reach their homes.
            run_dir = tempfile.mkdtemp(prefix="xffl-testbed.", dir="/tmp")
        args = [str(count), "--run-dir", str(run_dir), "--min-job-age", str(min_job_age)]
        if names:
            args += ["--names", ",".join(names)]
        if python:
            args += ["--python", python]
        if node_cpus:
            args += ["--node-cpus", str(node_cpus)]
        if parallel:
            args += ["--parallel", str(parallel)]
        # a facility takes under a second to start on an idle machine; a busy one is slower
        _run_script("up", *args, timeout=max(300, 20 * count))
        return cls(run_dir)

    def down(self, *, purge: bool = False) -> None:
        purging = ["--purge"] if purge else []
        _run_script("down", str(self.run_dir), *purging, timeout=max(300, 5 * len(self.facilities)))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def facility(self, name: str) -> Facility:
        for facility in self.facilities:
            if facility.name == name:
                return facility
        raise KeyError(f"no facility {name!r} in {self.run_dir}")

    def airflow_env(self) -> dict[str, str]:
        """``AIRFLOW_CONN_<ID>`` variables for every facility: what Airflow needs to reach them."""
        return {f"AIRFLOW_CONN_{f.conn_id.upper()}": json.dumps(f.connection) for f in self.facilities}

    def recorded_pids(self) -> list[int]:
        """Every daemon PID that ``up`` recorded."""
        files = list(self.run_dir.glob("pids/*.pid")) + list(self.run_dir.glob("*/pids/*.pid"))
        return sorted({int(p.read_text()) for p in files})

    def users(self) -> list[str]:
        return [f.user for f in self.facilities]
