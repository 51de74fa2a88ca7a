"""Access as real centres grant it, against a real sshd: user certificates and a jump host.

Starts (for this module, stopped by PID at its end by ``docker/facility/down``): a local
facility ``certsite`` of its own (slurmctld, slurmd, sshd, munged) whose sshd trusts a user CA
made for the run and no longer accepts the plain client key (``docker/facility/access ... ca
--cert-only``), and a bastion sshd in front of it (``access ... bastion``: own host key, own
user, forwarding only to the facility's sshd). One test stops and restarts the facility's sshd
to drop a poll loop's connection while its certificate has expired.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from xffl_airflow.hooks.slurm import SlurmHook
from xffl_airflow.hooks.slurm_poller import poller_for
from xffl_airflow.ssh import FacilityConnectionError, aget_target, connect, get_target
from xffl_airflow.transfer import RemoteFacility, TransferError, pull, push

from tests.plugins.xffl_airflow.hooks.slurm_support import wait_until

CERT_CONN = "facility_certsite_cert"
PLAIN_CONN = "facility_certsite_plain"
JUMP_CONN = "facility_certsite_jump"
BASTION_CONN = "bastion_certsite"
SCRIPT = "#!/bin/bash\n#SBATCH --comment=xffl/ssh_access_tests/r/t/-1\n#SBATCH --output={out}\n{body}\n"


@pytest.fixture(scope="module")
def bed(starts_facilities):
    from xffl_testbed.facilities import Testbed

    if os.geteuid() != 0:
        pytest.fail("the local facilities need root (useradd, Slurm daemons); run `make test` as root")
    testbed = Testbed.up(1, names=["certsite"])
    bastion_pid = None
    try:
        facility = testbed.facility("certsite")
        facility.enable_certificates(validity="-1m:+1h", cert_only=True)
        bastion = facility.start_bastion()
        bastion_pid = bastion.pid
        yield facility, bastion
    finally:
        testbed.down(purge=True)
    assert bastion_pid is not None and not _alive(bastion_pid)  # down stopped the bastion too


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def site(bed, monkeypatch):
    """The facility, its bastion, and their Airflow connections (certificate, plain key, jump)."""
    facility, bastion = bed
    cert = {**facility.connection, "extra": {**facility.connection["extra"],
            "certificate_file": str(Path(facility.facility_dir) / "client_cert.pub")}}  # fmt: skip
    jump = {**cert, "extra": {**cert["extra"], "jump_host": BASTION_CONN}}
    for conn_id, conn in ((CERT_CONN, cert), (PLAIN_CONN, facility.connection), (JUMP_CONN, jump),
                          (BASTION_CONN, bastion.connection)):  # fmt: skip
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    facility.sign_certificate("-1m:+1h")
    return facility, bastion


def run_job(conn_id: str, workdir: str, body: str) -> tuple[str, str]:
    with SlurmHook(ssh_conn_id=conn_id) as hook:
        real = hook.resolve_workdir(workdir)
        out = f"{real}/job-%j.log"
        job_id, _ = hook.submit(SCRIPT.format(out=out, body=body), workdir=real, script_name="j.sbatch")
        return job_id, out.replace("%j", job_id)


def round_trip(tmp_path: Path, facility, conn_id: str) -> None:
    """Pushes a small folder through ``conn_id`` and pulls it back, byte for byte."""
    local = tmp_path / "out"
    (local / "sub").mkdir(parents=True)
    (local / "weights.bin").write_bytes(os.urandom(300_000))
    (local / "sub" / "config.json").write_text('{"round": 1}')
    remote = RemoteFacility(name="certsite", conn_id=conn_id, workdir=facility.workdir)
    folder = f"access-{uuid.uuid4().hex[:8]}"
    push(local, remote, folder)
    pull(remote, folder, tmp_path / "back")
    for name in ("weights.bin", "sub/config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (local / name).read_bytes()


def test_only_a_certificate_logs_in_and_slurm_and_transfers_work_with_it(site, tmp_path):
    facility, _ = site
    with pytest.raises(FacilityConnectionError, match="refused the login") as caught:
        asyncio.run(connect(get_target(PLAIN_CONN)))  # the plain key is not authorized
    assert caught.value.retryable is False

    job_id, log = run_job(CERT_CONN, "xffl/cert", "echo certified")
    with SlurmHook(ssh_conn_id=CERT_CONN) as hook:
        wait_until(lambda: hook.query([job_id]).jobs[job_id].state == "COMPLETED", what="job completed")
        assert hook.log_tail(job_id, log, 5) == ["certified"]
    round_trip(tmp_path, facility, CERT_CONN)


def test_an_expired_certificate_is_retried_and_a_renewed_one_lets_the_job_end(site):
    """The certificate expires while the job runs and the poll loop's link drops: the poller
    reports the expiry (retryable, never fatal), and once renewed reads the job COMPLETED."""
    facility, _ = site
    facility.sign_certificate("-1m:+20s")
    expires = time.time() + 20
    job_id, _ = run_job(CERT_CONN, "xffl/cert", "sleep 35; echo done")

    async def watch_job() -> tuple[list[str], str]:
        problems: list[str] = []
        poller = poller_for(CERT_CONN)
        async with poller.watch(job_id, poll_interval=2, follow_log=False) as watch:
            dropped = renewed = False
            while True:
                update = await asyncio.wait_for(watch.updates.get(), timeout=120)
                assert update.fatal is None, update.fatal
                if update.problem:
                    problems.append(update.problem)
                if not dropped and time.time() > expires + 1:
                    # the link of the poll loop drops after the certificate's end
                    await asyncio.to_thread(facility.stop_sshd)
                    await asyncio.to_thread(facility.start_sshd)
                    dropped = True
                if not renewed and any("expired at" in p for p in problems):
                    with pytest.raises(FacilityConnectionError, match="expired at") as caught:
                        await connect(await aget_target(CERT_CONN))
                    assert caught.value.retryable is True
                    await asyncio.to_thread(facility.sign_certificate, "-1m:+1h")
                    renewed = True
                if update.final:
                    return problems, update.job.state

    problems, state = asyncio.run(watch_job())
    assert state == "COMPLETED"
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))[:-3]  # to the minute
    assert any(f"expired at {expiry}" in p for p in problems), problems


def test_slurm_and_transfers_through_a_jump_host(site, tmp_path, monkeypatch):
    facility, bastion = site
    target = get_target(JUMP_CONN)
    assert [hop.conn_id for hop in target.jumps] == [BASTION_CONN]

    async def through_the_bastion():
        conn = await connect(target)
        hop = conn._tunnel  # the bastion's connection, closed with the facility's
        user = (await conn.run("id -un", check=True)).stdout.strip()
        conn.close()
        await conn.wait_closed()
        return user, hop.is_closed()

    assert asyncio.run(through_the_bastion()) == (facility.user, True)
    job_id, log = run_job(JUMP_CONN, "xffl/jump", "echo jumped")
    with SlurmHook(ssh_conn_id=JUMP_CONN) as hook:
        wait_until(lambda: hook.query([job_id]).jobs[job_id].state == "COMPLETED", what="job completed")
        assert hook.log_tail(job_id, log, 5) == ["jumped"]
    round_trip(tmp_path, facility, JUMP_CONN)
    # the bastion's sshd saw the forwarding (the facility is reached only through it here)
    sshd_log = Path(facility.facility_dir, "log", "bastion-sshd.log").read_text()
    assert bastion.user in sshd_log

    wrong = {**bastion.connection, "extra": {**bastion.connection["extra"], "host_key": facility.host_key}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{BASTION_CONN.upper()}", json.dumps(wrong))
    with pytest.raises(FacilityConnectionError, match="jump host 'bastion_certsite'.*does not match") as caught:
        asyncio.run(connect(get_target(JUMP_CONN)))
    assert caught.value.retryable is False
    with pytest.raises(TransferError, match="does not match the pinned key"):
        push(tmp_path, RemoteFacility(name="certsite", conn_id=JUMP_CONN, workdir=facility.workdir), "x")


def test_the_bastion_forwards_only_to_its_facility(site):
    _, bastion = site
    result = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-i", bastion.client_key, "-p", str(bastion.ssh_port), f"{bastion.user}@127.0.0.1", "id"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0  # no shell there (ForceCommand /bin/false)
