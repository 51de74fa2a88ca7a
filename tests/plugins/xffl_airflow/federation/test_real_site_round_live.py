"""A federated round on a facility reached as real centres grant it, through the real Airflow:
only through a jump host, only with an SSH user certificate, Slurm only after ``module load
slurm`` (the facility's ``login_preamble``), and the certificate expires while the train task is
deferred on its job, is seen to have expired in the task's log, and is renewed: the task (first
try) and the round succeed.

Nothing is left to timing: the training job holds until the test releases it (a marker file), so
the job is still tracked when the expiry shows in the task log and when the certificate is
renewed; the link of the poll loop is dropped only once the certificate's end has passed.

Starts (stopped by PID at its end by ``docker/facility/down --purge``): a facility ``realsite`` of
its own (slurmctld, slurmd, sshd, munged) whose sshd accepts only certificates of a user CA made
for the run, and a bastion sshd in front of it. Writes that facility user's ``~/.bashrc`` (removed
with the user). Adds two connections to the session's ``airflow_instance`` and installs a DAG
file into its dags folder. Clean-up order: the run is stopped if unfinished, the DAG file removed,
and the dag-processor seen to have dropped it (DAG stale or unknown, no import error of the file)
before the connections the DAG names are deleted; then the facility and its bastion are stopped.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
import yaml
from xffl_airflow.ssh import certificate_validity

from tests.plugins.xffl_airflow.federation.campaign_support import TRAINING, ti_states
from tests.plugins.xffl_airflow.hooks.slurm_support import wait_until
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import (
    LocalFacility,
    install_federation_dag,
    place_private_data,
    wait_for_campaign,
    write_config,
)

pytestmark = pytest.mark.slow

CAMPAIGN = "realsite"
DAG_ID = f"xffl_{CAMPAIGN}"
RUN_ID = f"xffl__{CAMPAIGN}__round-0000"
SITE_CONN = "facility_realsite_jump"
BASTION_CONN = "bastion_realsite"
HOLD_SECONDS = 900  # the longest the training job waits for its release before going on
SHORT_VALIDITY = "-1m:+5s"


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


@pytest.fixture
def campaign_dag(airflow_instance, realsite):
    """Where the campaign's DAG file goes in the dags folder. Torn down before ``realsite``: the
    run is stopped, the file removed, and the dag-processor seen to have dropped it while the
    connections it names still exist (parsed without them, it would be an import error that
    every later live test of the session trips over)."""
    airflow = airflow_instance
    dag_file = airflow.dags_folder / f"xffl_federation_{CAMPAIGN}.py"
    yield dag_file
    with contextlib.suppress(AirflowError):
        if airflow.dag_run(DAG_ID, RUN_ID)["state"] not in ("success", "failed"):
            airflow.api("PATCH", f"dags/{DAG_ID}/dagRuns/{RUN_ID}", json={"state": "failed"})
    with contextlib.suppress(AirflowError):
        airflow.api("PATCH", f"dags/{DAG_ID}", json={"is_paused": True})
    airflow.remove_dag_file(dag_file, DAG_ID)


def test_a_round_through_a_bastion_with_an_expiring_certificate_and_module_load(
    airflow_instance, realsite, campaign_dag, install_dag, tiny, storage
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

    # the training job holds until released: it is surely still tracked while the test works
    release = Path(facility.home) / "release-training"
    hold = f"for _ in $(seq {HOLD_SECONDS}); do [ -e {shlex.quote(str(release))} ] && break; sleep 1; done"
    entry = LocalFacility(facility, data, conn_id=SITE_CONN, preamble=[hold])
    config = write_config(
        storage / f"{CAMPAIGN}.yaml", campaign=CAMPAIGN, storage=storage, base_model=tiny / "model",
        python=facility.python, facilities=[entry], training=TRAINING, convergence={"max_rounds": 1},
    )  # fmt: skip
    settings = yaml.safe_load(config.read_text())
    settings["facilities"][0]["login_preamble"] = ["module load slurm"]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    stub = install_federation_dag(storage, config, name=CAMPAIGN)
    assert stub.name == campaign_dag.name  # the file the clean-up removes
    install_dag(stub, DAG_ID)
    airflow.trigger(DAG_ID, run_id=RUN_ID, conf={"round": 0})
    train = f"{facility.name}.train"

    def train_ti() -> dict:
        return ti_states(airflow, DAG_ID, RUN_ID)[train]

    wait_until(
        lambda: running_jobs(facility) and train_ti()["state"] == "deferred",
        timeout=300, every=1, what="train deferred while its job runs",
    )  # fmt: skip
    # the trigger's poll loop holds a working link: it has read the job RUNNING
    wait_for_log(airflow, train, r"Slurm job \S+ is RUNNING", timeout=180)

    # the certificate runs out while the job is tracked ...
    before = valid_before(facility.sign_certificate(SHORT_VALIDITY))
    time.sleep(max(0.0, before - time.time()) + 1.0)
    assert time.time() > before
    # ... and the link of the poll loop drops after its end: the reconnect meets the expiry
    facility.stop_sshd()
    facility.start_sshd()
    expired = f"expired at {utc(before)}"
    seen_deferred = wait_for_log(airflow, train, re.escape(expired), timeout=240)
    assert seen_deferred["state"] == "deferred" and seen_deferred["try_number"] == 1, seen_deferred
    assert running_jobs(facility), "the job ended before the renewal: nothing proven"

    facility.sign_certificate("-1m:+1h")  # renewed while the task is deferred
    release.write_text("renewed\n")

    runs = wait_for_campaign(airflow, DAG_ID, CAMPAIGN, storage / CAMPAIGN, timeout=900)
    assert [r["state"] for r in runs] == ["success"], runs
    ti = train_ti()
    assert (ti["state"], ti["try_number"]) == ("success", 1), ti  # never read as failed
    manifest = json.loads((storage / CAMPAIGN / "round-0000" / "manifest.json").read_text())
    assert manifest["participants"] == [facility.name]
    assert manifest["facilities"][facility.name]["job"]["state"] == "COMPLETED"
    log = airflow.task_log(DAG_ID, RUN_ID, train, try_number=1)
    # the trigger's warning named the certificate and its end; then Slurm answered again
    assert expired in log and "renew it" in log, log[-3000:]
    # said when first met (the try after the dropped link), not only at a tenth failed try
    first = re.search(re.escape(expired) + r".*?\(try (\d+), again in", log)
    assert first and int(first[1]) < 10, log[-3000:]
    assert f"Slurm at {SITE_CONN} answers again" in log.split(expired, 1)[1], log[-3000:]
    # the bastion's sshd carried the connections (the facility is reached only through it)
    assert bastion.user in Path(facility.facility_dir, "log", "bastion-sshd.log").read_text()


def wait_for_log(airflow, task_id: str, pattern: str, *, timeout: float) -> dict:
    """Waits until the task's first-try log matches ``pattern`` (a regular expression) while
    the task keeps one state on either side of the read; returns the task instance then."""
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        before = ti_states(airflow, DAG_ID, RUN_ID)[task_id]
        with contextlib.suppress(AirflowError):
            log = airflow.task_log(DAG_ID, RUN_ID, task_id, try_number=1)
        after = ti_states(airflow, DAG_ID, RUN_ID)[task_id]
        if re.search(pattern, log) and before["state"] == after["state"]:
            return after
        time.sleep(3)
    pytest.fail(
        f"{task_id}'s log never matched {pattern!r} in {timeout:.0f} s; its end:\n{log[-3000:]}"
    )


def valid_before(cert_path: str) -> int:
    """The end of the certificate's validity, in seconds since the epoch."""
    return certificate_validity(asyncssh.read_certificate(cert_path))[1]


def utc(seconds: float) -> str:
    """A moment as the SSH errors write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def running_jobs(facility) -> list[str]:
    """Names of the facility's RUNNING jobs, asked as root (the user logs in by certificate only)."""
    return facility.slurm_admin("squeue", "-h", "-t", "RUNNING", "-o", "%j").stdout.split()
