"""The local facilities of docker/facility: real slurmctld, slurmd, sshd and munged.

Starts: the session's two facilities (``testbed`` fixture) and, in
``test_down_leaves_no_process_of_ours``, one more facility of its own. Everything is stopped by
``docker/facility/down``, by PID.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from xffl_testbed.facilities import SCRIPTS, Testbed
from xffl_testbed.processes import alive, with_descendants

pytestmark = pytest.mark.usefixtures("starts_facilities")



def wait_for_job(facility, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = facility.ssh(f"scontrol show -o job {job_id}").stdout
        state = out.split("JobState=")[1].split()[0]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} on {facility.name} did not end in {timeout} s")


@pytest.mark.parametrize("name", ["site1", "site2"])
def test_sbatch_over_ssh_runs_as_the_facility_user(testbed, name):
    facility = testbed.facility(name)
    job_id = facility.ssh(
        "cd xffl && sbatch --parsable --job-name=whoami --output=whoami-%j.out "
        "--wrap 'id -un; echo cluster=$SLURM_CLUSTER_NAME'"
    ).stdout.strip()
    assert job_id.isdigit(), job_id
    assert wait_for_job(facility, job_id) == "COMPLETED"
    output = Path(facility.workdir, f"whoami-{job_id}.out").read_text().split()
    assert output == [facility.user, f"cluster={name}"]


def test_each_facility_has_its_own_cluster_and_ports(testbed):
    a, b = testbed.facilities
    assert a.user != b.user
    ports = {a.ssh_port, a.slurmctld_port, a.slurmd_port, b.ssh_port, b.slurmctld_port, b.slurmd_port}
    assert len(ports) == 6
    for facility in (a, b):
        cluster = facility.ssh("scontrol show config | grep '^ClusterName'").stdout.split("=")[1].strip()
        assert cluster == facility.name


def test_other_facility_user_is_refused(testbed):
    a, b = testbed.facilities
    result = b.ssh("true", user=a.user, key=a.client_key, check=False)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_host_key_mismatch_is_refused(testbed, tmp_path):
    a, b = testbed.facilities
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{a.host}]:{a.ssh_port} {b.host_key}\n")
    argv = a.ssh_argv("true")
    argv[argv.index(f"UserKnownHostsFile={a.known_hosts_file()}")] = f"UserKnownHostsFile={wrong}"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


def test_airflow_connection_reaches_facility_with_pinned_host_key(testbed, monkeypatch):
    """The connection that `up` writes works with Airflow's own SSHHook, host-key check on."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    facility = testbed.facility("site1")
    for key, value in testbed.airflow_env().items():
        monkeypatch.setenv(key, value)
    hook = SSHHook(ssh_conn_id=facility.conn_id)
    assert hook.no_host_key_check is False
    with hook.get_conn() as client:
        code, out, _ = hook.exec_ssh_client_command(client, "id -un", get_pty=False, environment=None)
    assert code == 0 and out.decode().strip() == facility.user

    monkeypatch.setenv(
        f"AIRFLOW_CONN_{facility.conn_id.upper()}",
        json.dumps({**facility.connection, "extra": {**facility.connection["extra"], "host_key": testbed.facilities[1].host_key}}),
    )
    with pytest.raises(Exception, match="(?i)host key|not match|BadHostKey"):
        SSHHook(ssh_conn_id=facility.conn_id).get_conn()


def test_up_refuses_a_run_directory_that_is_up(testbed):
    result = subprocess.run(
        [str(SCRIPTS / "up"), "1", "--run-dir", str(testbed.run_dir)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "already up" in result.stderr
    # ...and the running facilities were not touched.
    assert all(alive(pid) for pid in testbed.recorded_pids())


def test_up_refuses_a_bad_facility_name():
    result = subprocess.run([str(SCRIPTS / "up"), "1", "--names", "x;touch /tmp/pwned"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "bad facility name" in result.stderr


def test_down_leaves_no_process_of_ours():
    bed = Testbed.up(1, names=["solo"])
    facility = bed.facilities[0]
    facility.ssh("cd xffl && sbatch --wrap 'sleep 300' && sbatch --wrap 'sleep 300'")
    deadline = time.monotonic() + 30
    while "R" not in facility.ssh("squeue -h -o %t").stdout.split():
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.3)
    started = with_descendants(bed.recorded_pids())
    uid = pwd.getpwnam(facility.user).pw_uid
    assert len(started) >= 5  # munged, slurmctld, slurmd, sshd and what they forked
    bed.down()
    survivors = [pid for pid in started if alive(pid)]
    assert survivors == []
    from_user = [
        p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == uid and alive(int(p.name))
    ]
    assert from_user == []
    with pytest.raises(KeyError):
        pwd.getpwnam(facility.user)
    bed.down(purge=True)  # twice is fine
    assert not bed.run_dir.exists()


def _uid_of(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def test_down_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    result = subprocess.run([str(SCRIPTS / "down"), str(tmp_path), "--purge"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "not a run directory" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "not ours"
