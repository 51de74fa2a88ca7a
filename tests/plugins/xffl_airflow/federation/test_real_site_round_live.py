"""A federated round on a facility reached as real centres grant it, through the real Airflow:
only through a jump host, only with an SSH user certificate, Slurm only after ``module load
slurm`` (the facility's ``login_preamble``), and the certificate expires while the training job
runs and is renewed while the train task is deferred: the task (first try) and the round succeed.

Starts (stopped by PID at its end by ``docker/facility/down --purge``): a facility ``realsite`` of
its own (slurmctld, slurmd, sshd, munged) whose sshd accepts only certificates of a user CA made
for the run, and a bastion sshd in front of it. Writes that facility user's ``~/.bashrc`` (removed
with the user). Adds two connections to the session's ``airflow_instance`` (deleted at the end).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from tests.plugins.xffl_airflow.hooks.slurm_support import wait_until
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import (
    LocalFacility,
    place_private_data,
    start_campaign,
    wait_for_campaign,
    write_config,
)

pytestmark = [pytest.mark.slurm, pytest.mark.airflow_live, pytest.mark.slow]

CAMPAIGN = "realsite"
SITE_CONN = "facility_realsite_jump"
BASTION_CONN = "bastion_realsite"
JOB_SECONDS = 90  # the batch preamble keeps the training job running this long first


@pytest.fixture
def realsite(airflow_instance, tiny):
    """The cert-only facility behind its bastion, with its two Airflow connections."""
    from tests.conftest import facility_python
    from xffl_testbed.facilities import Testbed

    testbed = Testbed.up(1, names=["realsite"], python=facility_python())
    try:
        facility = testbed.facility("realsite")
        cert = facility.enable_certificates(validity="-1m:+1h", cert_only=True)
        bastion = facility.start_bastion()
        # a login node where Slurm answers only after `module load slurm`
        bashrc = Path(facility.home) / ".bashrc"
        bashrc.write_text(
            "unset SLURM_CONF\n"
            "echo 'Lmod: 3 modules available' >&2\n"
            f"module() {{ if [ \"$1 $2\" = 'load slurm' ]; then export SLURM_CONF={shlex.quote(facility.slurm_conf)}; "
            'else echo "module: $2 not found" >&2; return 1; fi; }\n'
        )  # fmt: skip
        bashrc.chmod(0o644)
        data = place_private_data(facility, tiny / "data" / "czech", "czech")
        site_extra = {"key_file": facility.client_key, "certificate_file": cert, "host_key": facility.host_key,
                      "jump_host": BASTION_CONN, "conn_timeout": 10}  # fmt: skip
        for conn_id, conn, extra in (
            (BASTION_CONN, bastion.connection, bastion.connection["extra"]),
            (SITE_CONN, facility.connection, site_extra),
        ):
            airflow_instance.api("POST", "connections", json={
                "connection_id": conn_id, "conn_type": "ssh", "host": conn["host"], "port": conn["port"],
                "login": conn["login"], "extra": json.dumps(extra),
            })  # fmt: skip
        yield facility, bastion, data
    finally:
        for conn_id in (SITE_CONN, BASTION_CONN):
            try:
                airflow_instance.api("DELETE", f"connections/{conn_id}")
            except AirflowError:
                pass  # never added
        testbed.down(purge=True)


def test_a_round_through_a_bastion_with_an_expiring_certificate_and_module_load(
    airflow_instance, realsite, tiny, storage
):
    airflow = airflow_instance
    facility, bastion, data = realsite
    # only a certificate logs in, and Slurm is not reachable without the login preamble
    assert facility.ssh("true", check=False).returncode != 0
    with_cert = facility.ssh_argv("squeue -h")
    with_cert[1:1] = ["-o", f"CertificateFile={Path(facility.facility_dir) / 'client_cert.pub'}"]
    assert subprocess.run(with_cert, capture_output=True, timeout=60).returncode != 0
    with_cert[-1] = "module load slurm && squeue -h"
    assert subprocess.run(with_cert, capture_output=True, timeout=60).returncode == 0
    entry = LocalFacility(facility, data, conn_id=SITE_CONN, preamble=[f"sleep {JOB_SECONDS}"])
    config = write_config(
        storage / f"{CAMPAIGN}.yaml", campaign=CAMPAIGN, storage=storage, base_model=tiny / "model",
        python=facility.python, facilities=[entry], training=TRAINING, convergence={"max_rounds": 1},
    )  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    settings["facilities"][0]["login_preamble"] = ["module load slurm"]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))

    dag_id = start_campaign(airflow, config, CAMPAIGN)
    run_id = f"xffl__{CAMPAIGN}__round-0000"
    train = f"{facility.name}.train"

    def deferred_while_the_job_runs() -> bool:
        return (
            bool(running_jobs(facility))
            and ti_states(airflow, dag_id, run_id)[train]["state"] == "deferred"
        )

    wait_until(
        deferred_while_the_job_runs, timeout=240, every=1, what="train deferred while its job runs"
    )
    # the certificate runs out while the job runs; the poll loop's link drops after its end
    facility.sign_certificate("-1m:+8s")
    expires = time.time() + 8
    time.sleep(10)
    facility.stop_sshd()
    facility.start_sshd()

    def expiry_reported() -> bool:
        said = airflow.component_log("triggerer")
        try:
            said += airflow.task_log(dag_id, run_id, train, try_number=1)
        except AirflowError:
            pass
        return "expired at" in said

    seen = _poll(expiry_reported, 60)
    still_running = bool(running_jobs(facility))
    facility.sign_certificate("-1m:+1h")  # renewed while the task is deferred
    assert seen, "the triggerer never reported the expired certificate"
    assert still_running, "the job ended before the certificate was renewed: nothing proven"
    assert time.time() > expires

    runs = wait_for_campaign(airflow, dag_id, CAMPAIGN, storage / CAMPAIGN, timeout=600)
    assert [r["state"] for r in runs] == ["success"], runs
    states = ti_states(airflow, dag_id, run_id)
    assert (
        states[train]["state"] == "success" and states[train]["try_number"] == 1
    )  # never read as failed
    manifest = json.loads((storage / CAMPAIGN / "round-0000" / "manifest.json").read_text())
    assert manifest["participants"] == [facility.name]
    assert manifest["facilities"][facility.name]["job"]["state"] == "COMPLETED"
    log = airflow.task_log(dag_id, run_id, train, try_number=1)
    expiry = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(expires))
    assert f"expired at {expiry}" in log, log[-3000:]  # the trigger's warning, in the task's log
    # the bastion's sshd carried the connections (the facility is reached only through it)
    assert bastion.user in Path(facility.facility_dir, "log", "bastion-sshd.log").read_text()


def _poll(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(2)
    return False


def running_jobs(facility) -> list[str]:
    """Names of the facility's RUNNING jobs, asked as root (the user logs in by certificate only)."""
    return facility.slurm_admin("squeue", "-h", "-t", "RUNNING", "-o", "%j").stdout.split()
