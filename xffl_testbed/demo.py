"""``make demo``: the main job on the embedded default.

Until the federation DAG exists this runs a smaller end-to-end check, and says so: it brings
up two local facilities, submits one Slurm job to each over SSH (host keys pinned) that imports
the facility-side stack, waits for both, prints what each reported, and tears everything down.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from xffl_testbed.facilities import Testbed

PROBE = (
    "import platform, getpass, safetensors, torch, transformers, xffl_tasks; "
    "print(f'{getpass.getuser()} on cluster ' + __import__('os').environ['SLURM_CLUSTER_NAME'] + "
    "f': xffl_tasks {xffl_tasks.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
    "safetensors {safetensors.__version__}, python {platform.python_version()}')"
)


def main() -> int:
    python = os.environ.get("XFFL_FACILITY_PYTHON", ".venv-facility/bin/python")
    print("xffl-airflow demo: the federation DAG is not built yet, so this runs a smaller")
    print("end-to-end check: two local Slurm facilities behind sshd, one job on each.\n")
    started = time.monotonic()
    testbed = Testbed.up(2, names=["italy", "czechia"], python=python)
    try:
        jobs = {}
        for facility in testbed.facilities:
            command = f"{shlex.quote(python)} -c {shlex.quote(PROBE)}"
            submit = (
                "cd xffl && sbatch --parsable --job-name=xffl-demo --output=demo-%j.out "
                f"--wrap {shlex.quote(command)}"
            )
            jobs[facility.name] = facility.ssh(submit).stdout.strip()
            print(f"[{facility.name}] submitted Slurm job {jobs[facility.name]} over ssh -p {facility.ssh_port}")
        for facility in testbed.facilities:
            job_id = jobs[facility.name]
            state = ""
            for _ in range(600):
                state = facility.ssh(f"scontrol show -o job {job_id}").stdout.split("JobState=")[1].split()[0]
                if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                    break
                time.sleep(0.5)
            output = facility.ssh(f"cat xffl/demo-{job_id}.out").stdout.strip()
            print(f"[{facility.name}] job {job_id} {state}: {output}")
            if state != "COMPLETED":
                return 1
    finally:
        testbed.down(purge=True)
    print(f"\ndone in {time.monotonic() - started:.1f} s; every process started was stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
