"""FSDP2 (``xffl_tasks.train``) at a local Slurm facility: two CPU processes over gloo started
by ``srun`` (two tasks) and by ``torchrun`` (one task, two workers), full fine-tuning and a
LoRA adapter, each against DDP started the same way: the same per-step losses and the same
published tensors (tolerances in ``tests/xffl_tasks/train/equivalence.py``), written through
the sharded checkpoint.

Starts: nothing of its own; uses the session's ``testbed`` (site1: slurmctld, slurmd and sshd)
and submits two batch jobs over ssh as the facility user, each running four trainings one
after the other (srun: ``--ntasks=2 --cpus-per-task=1``; torchrun: ``--ntasks=1
--cpus-per-task=2``; the node has 2 CPUs); a job still running at the time limit is cancelled.
The training lines come from the Airflow side's ``build_training_command``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.xffl_tasks.train.equivalence import TWO_PROCESS_FLAGS, assert_trains_as_ddp, metrics_of
from xffl_tasks.adapter import ADAPTER_WEIGHTS
from xffl_tasks.train.checkpoint import SAFE_WEIGHTS

pytestmark = pytest.mark.slow

# the unit tier's flags (8 steps of 2 x 4 x 64 tokens, fp32, one thread), as hyperparameters
HYPERPARAMETERS = {
    flag[2:].replace("-", "_"): value
    for flag, value in zip(TWO_PROCESS_FLAGS[::2], TWO_PROCESS_FLAGS[1::2])
}
KINDS = {
    "full": ({}, SAFE_WEIGHTS),
    "lora": ({"peft": "lora", "gradient_accumulation": 2}, ADAPTER_WEIGHTS),
}
JOBS = {  # launcher -> (sbatch options, nproc_per_node, metrics["launcher"])
    "srun": (["--ntasks=2", "--cpus-per-task=1"], 1, "slurm"),
    "torchrun": (["--ntasks=1", "--cpus-per-task=2"], 2, "torchrun"),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def typed(values: dict[str, str]) -> dict[str, object]:
    from xffl_tasks.train.config import FIELDS_BY_NAME, parse_text

    return {
        name: parse_text(FIELDS_BY_NAME[name], text, where=name) for name, text in values.items()
    }


def submit(facility, home: Path, name: str, sbatch: list[str], commands: list[str]) -> str:
    script = home / f"{name}.sh"
    lines = ["#!/bin/bash", *[f"#SBATCH {line}" for line in sbatch], "set -e", *commands, ""]
    script.write_text("\n".join(lines))
    subprocess.run(["chown", f"{facility.user}:{facility.user}", str(script)], check=True)
    return facility.ssh(
        f"sbatch --parsable --chdir={home} --output={home}/{name}-%j.out {script}"
    ).stdout.strip()


def wait_for(facility, job_id: str, deadline: float) -> str:
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        text = facility.ssh(f"scontrol show -o job {job_id}").stdout
        state = text.split("JobState=")[1].split()[0]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(2)
    facility.ssh(f"scancel {job_id}", check=False)
    return f"{state} (cancelled at the time limit)"


@pytest.fixture(scope="module")
def facility_runs(testbed, tmp_path_factory):
    """``(launcher, kind, parallelism) -> out`` for both jobs at site1, run to their end."""
    from xffl_airflow.training_job import build_training_command

    from xffl_tasks.tiny import make_tiny

    facility = testbed.facility("site1")
    tiny = make_tiny(tmp_path_factory.mktemp("tiny-fsdp") / "tiny", seed=0)  # the unit tier's
    home = Path(facility.home) / "fsdp-test"
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(tiny, home)
    subprocess.run(["chown", "-R", f"{facility.user}:{facility.user}", str(home)], check=True)
    outs, jobs = {}, {}
    try:
        for launcher, (sbatch, nproc, _) in JOBS.items():
            commands = []
            for kind, (extra, _) in KINDS.items():
                for parallelism in ("ddp", "fsdp"):
                    out = home / f"out-{launcher}-{kind}-{parallelism}"
                    outs[launcher, kind, parallelism] = out
                    hyperparameters = {**typed(HYPERPARAMETERS), **extra, "parallelism": parallelism,
                                       "master_port": free_port()}  # fmt: skip
                    commands.append(build_training_command(
                        python=facility.python, launcher=launcher, model_dir=str(home / "model"),
                        data_path=str(home / "data" / "czech"), out_dir=str(out),
                        hyperparameters=hyperparameters, nproc_per_node=nproc,
                    ))  # fmt: skip
            options = [f"--partition={facility.partition}", "--time=00:20:00", *sbatch]
            jobs[launcher] = submit(facility, home, f"fsdp-{launcher}", options, commands)
        deadline = time.monotonic() + 900
        for launcher, job_id in jobs.items():
            state = wait_for(facility, job_id, deadline)
            logs = "".join(p.read_text() for p in home.glob(f"fsdp-{launcher}-*.out"))
            assert state == "COMPLETED", f"{launcher} job {job_id}: {state}\n{logs[-6000:]}"
        yield outs
    finally:
        for job_id in jobs.values():
            facility.ssh(f"scancel {job_id}", check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("launcher", JOBS)
def test_fsdp2_at_a_facility_trains_as_ddp(facility_runs, launcher, kind, record_property):
    ddp, fsdp = (facility_runs[launcher, kind, p] for p in ("ddp", "fsdp"))
    for parallelism, out in (("ddp", ddp), ("fsdp", fsdp)):
        metrics = metrics_of(out)
        expected = {"world_size": 2, "launcher": JOBS[launcher][2], "parallelism": parallelism,
                    "threads": 1, "device": "cpu", "precision": "fp32"}  # fmt: skip
        assert {key: metrics[key] for key in expected} == expected
        assert not (out / ".shards").exists()
    for key, value in assert_trains_as_ddp(ddp, fsdp, KINDS[kind][1]).items():
        record_property(key, value)  # in the JUnit report (--junitxml)
