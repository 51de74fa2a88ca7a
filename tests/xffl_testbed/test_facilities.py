"""Where the test bed, the demo and the benchmarks look for the facility-side Python; and many
facilities brought up at once (live: the two tests marked ``slurm`` start facilities of their
own, each a slurmctld, slurmd and sshd beside one munged, and stop them with ``down``)."""

from __future__ import annotations

import pwd
import re
import subprocess
import tempfile
from pathlib import Path

from xffl_testbed import facilities
from xffl_testbed.facilities import SCRIPTS, Testbed, facility_python
from xffl_testbed.processes import alive, with_descendants


def test_the_environment_variable_make_exports_wins(monkeypatch):
    monkeypatch.setenv("XFFL_FACILITY_PYTHON", "/opt/facility/bin/python")
    assert facility_python() == "/opt/facility/bin/python"


def test_without_it_the_makefile_fallback_path_is_found(monkeypatch, tmp_path):
    """A checkout the facility users cannot read keeps the environment in /var/tmp, under the
    same hash of the checkout's path as the Makefile computes."""
    monkeypatch.delenv("XFFL_FACILITY_PYTHON", raising=False)
    monkeypatch.setattr(facilities, "REPO", tmp_path)
    makefile_digest = subprocess.run(
        ["sh", "-c", 'echo "$0" | md5sum | cut -c1-10', str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{10}", makefile_digest)
    assert facility_python() == f"/var/tmp/xffl-airflow-facility-{makefile_digest}/bin/python"
    (tmp_path / ".venv-facility" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-facility" / "bin" / "python").touch()
    assert facility_python() == str(tmp_path / ".venv-facility" / "bin" / "python")


# -- many facilities at once (live: real slurmctld, slurmd, sshd, munged) --------------------


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def _users_left(users: list[str]) -> list[str]:
    left = []
    for user in users:
        try:
            pwd.getpwnam(user)
            left.append(user)
        except KeyError:
            pass
    return left
def test_facilities_started_in_parallel_each_get_their_own_ports_and_answer(starts_facilities):
    """Starts 4 facilities, 4 at once (their daemons and one munged); stops them with down."""
    bed = Testbed.up(4, names=["pa", "pb", "pc", "pd"], parallel=4)
    try:
        started = with_descendants(bed.recorded_pids())
        ports = [p for f in bed.facilities for p in (f.ssh_port, f.slurmctld_port, f.slurmd_port)]
        assert len(set(ports)) == 12
        # below the ephemeral range: no outgoing connection can take one before its daemon binds
        assert all(port < _ephemeral_low() for port in ports)
        for facility in bed.facilities:
            answer = facility.ssh("sinfo -h -N -o %T; scontrol show config | grep ^ClusterName")
            state, cluster = answer.stdout.split("\n", 1)
            assert (state, cluster.split("=")[1].strip()) == ("idle", facility.name)
    finally:
        bed.down(purge=True)
    assert [pid for pid in started if alive(pid)] == []
    assert _users_left(bed.users()) == []
def test_a_facility_that_fails_to_start_stops_every_facility_started_beside_it(starts_facilities):
    """Starts 3 facilities, 2 at once, with a facility Python that fails its check: up stops
    every daemon it started (down, by PID) and says which facilities failed and why."""
    run_dir = Path(tempfile.mkdtemp(prefix="xffl-testbed.", dir="/tmp"))
    try:
        result = subprocess.run(
            [str(SCRIPTS / "up"), "3", "--run-dir", str(run_dir), "--names", "fa,fb,fc",
             "--parallel", "2", "--python", "/bin/false"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode != 0
        assert "cannot run '/bin/false -c" in result.stderr
        assert re.search(r"facilities did not start: f[abc]", result.stderr), result.stderr
        assert (run_dir / "state").read_text().strip() == "down"
        recorded = [int(p.read_text()) for p in run_dir.glob("*/pids/*.pid")]
        recorded += [int(p.read_text()) for p in run_dir.glob("pids/*.pid")]
        assert len(recorded) >= 4  # munged and at least one facility's daemons had started
        assert [pid for pid in recorded if alive(pid)] == []
        users = [f"xffl-{(run_dir / 'token').read_text().strip()}-{n}" for n in ("fa", "fb", "fc")]
        assert _users_left(users) == []
    finally:
        if (run_dir / "token").exists():
            subprocess.run(
                [str(SCRIPTS / "down"), str(run_dir), "--purge"], capture_output=True, timeout=300
            )
