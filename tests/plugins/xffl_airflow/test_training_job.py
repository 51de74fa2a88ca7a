"""The training line of a facility's batch script: literal outputs, quoting checked by a real
shell, validation errors naming the field; then the same commands run as real Slurm jobs.

The pure tests start nothing but ``bash`` (to split a built command). The ``slurm`` tests use
the session's local facilities (``testbed``: slurmctld, slurmd and sshd per facility) and submit
three training jobs to ``site1`` over ssh: one process (``none``), two ``srun`` tasks, and one
``torchrun`` with two workers; each runs to its end.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from xffl_airflow.training_job import (
    TrainingJobError,
    build_training_argv,
    build_training_command,
    hyperparameter_arguments,
)

from xffl_tasks.train.__main__ import parse_arguments

PY = "/leonardo_work/PROJ/venv/bin/python"
PATHS = {
    "model_dir": "/w/round-0001/global",
    "data_path": "/data/italian",
    "out_dir": "/w/round-0001/local",
}
TASK = (
    "-m xffl_tasks.train --model /w/round-0001/global --data /data/italian --out /w/round-0001/local "
    "--learning-rate 0.003 --max-steps 30 --threads 1"
)
HP = {"max_steps": 30, "learning_rate": 0.003, "threads": 1}


def test_one_process():
    command = build_training_command(python=PY, launcher="none", hyperparameters=HP, **PATHS)
    assert command == f"{PY} {TASK}"


def test_srun_one_task_per_gpu_with_environment():
    command = build_training_command(
        python=PY, launcher="srun", hyperparameters=HP, extra_env={"NCCL_DEBUG": "WARN", "HF_HOME": "/scratch/hf cache"},
        **PATHS,
    )  # fmt: skip
    assert (
        command
        == f"HF_HOME='/scratch/hf cache' NCCL_DEBUG=WARN srun --kill-on-bad-exit=1 --export=ALL {PY} {TASK}"
    )


def test_torchrun_one_per_node():
    command = build_training_command(
        python=PY, launcher="torchrun", hyperparameters=HP, nproc_per_node=4, **PATHS
    )
    assert command == (
        'srun --kill-on-bad-exit=1 --export=ALL --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" '
        """--ntasks-per-node=1 sh -c 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"' """
        f'{PY} --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node=4 --rdzv-backend=static '
        '--master-addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" '
        "--master-port=$((15000 + SLURM_JOB_ID % 20000)) "
        f"{TASK}"
    )


def test_torchrun_with_a_fixed_port():
    command = build_training_command(
        python=PY,
        launcher="torchrun",
        hyperparameters={"master_port": 29400},
        nproc_per_node=8,
        **PATHS,
    )
    assert " --master-port=29400 " in command
    assert command.endswith("--out /w/round-0001/local --master-port 29400")


def test_flags_in_the_task_order_with_booleans_and_nulls():
    words = hyperparameter_arguments(
        {
            "gradient_checkpointing": True,
            "seq_len": None,
            "precision": "bf16",
            "learning_rate": 2e-05,
            "epochs": 1,
        }
    )
    assert words == [
        "--learning-rate",
        "2e-05",
        "--epochs",
        "1.0",
        "--precision",
        "bf16",
        "--gradient-checkpointing",
    ]
    assert hyperparameter_arguments({"gradient_checkpointing": False}) == [
        "--no-gradient-checkpointing"
    ]
    assert hyperparameter_arguments({}) == []


def test_the_task_parses_what_the_builder_writes():
    hyperparameters = {
        "learning_rate": 2e-05, "lr_schedule": "cosine", "warmup_steps": 100, "batch_size": 4,
        "gradient_accumulation": 8, "seq_len": 2048, "precision": "bf16", "seed": 42, "epochs": 1,
        "gradient_checkpointing": True, "val_file": "/data/it/held out.jsonl", "max_shard_size": "2GB",
    }  # fmt: skip
    argv = build_training_argv(hyperparameters=hyperparameters, **PATHS)
    config = parse_arguments(argv[2:])
    assert (config.model, config.data, config.out) == (
        "/w/round-0001/global",
        "/data/italian",
        "/w/round-0001/local",
    )
    for name, value in hyperparameters.items():
        assert getattr(config, name) == value, name


def test_hostile_values_reach_the_task_intact(tmp_path):
    # A stand-in for the Python that prints its arguments, NUL-separated, so a real shell splits the line.
    printer = tmp_path / "print args"
    printer.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done\n')
    printer.chmod(0o755)
    hostile = {
        "model_dir": "/w/it's $(touch pwned) `id`",
        "data_path": "/data/a;b|c&d",
        "out_dir": "/w/out\tdir*",
    }
    command = build_training_command(
        python=str(printer), launcher="none", hyperparameters={"text_field": "body"},
        extra_env={"X": "$(touch pwned)"}, **hostile,
    )  # fmt: skip
    result = subprocess.run(
        ["bash", "-c", command], check=True, capture_output=True, cwd=tmp_path, timeout=30
    )
    args = result.stdout.decode().split("\0")[:-1]
    assert args == [
        "-m", "xffl_tasks.train", "--model", hostile["model_dir"], "--data", hostile["data_path"],
        "--out", hostile["out_dir"], "--text-field", "body",
    ]  # fmt: skip
    assert shlex.split(command)[1:] == [str(printer), *args]
    assert list(tmp_path.iterdir()) == [printer]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"launcher": "mpirun"}, "launcher: 'mpirun' is not one of none, srun, torchrun"),
        ({"model_dir": "round/global"}, "model_dir: must be an absolute path"),
        ({"data_path": ""}, "data_path: must be a non-empty string"),
        ({"out_dir": "/w/out\n/x"}, "out_dir: must be a single line"),
        ({"python": "py\nthon"}, "python: must be a single line"),
        (
            {"hyperparameters": {"lerning_rate": 0.1}},
            "hyperparameters: lerning_rate: unknown field",
        ),
        (
            {"hyperparameters": {"batch_size": "8"}},
            "hyperparameters: batch_size: expected a whole number",
        ),
        ({"hyperparameters": {"model": "/m"}}, "hyperparameters: model: unknown field"),
        (
            {"hyperparameters": {"precision": "fp16"}},
            "hyperparameters: precision: 'fp16' is not one of",
        ),
        ({"nproc_per_node": 0}, "nproc_per_node: must be a whole number from 1"),
        ({"nproc_per_node": 4, "launcher": "srun"}, "nproc_per_node: 4 is for launcher torchrun"),
        ({"extra_env": {"1X": "a"}}, "extra_env: '1X' is not a valid environment variable name"),
        ({"extra_env": {"X": "a\nb"}}, "extra_env.X: must be a single-line string"),
    ],
)
def test_bad_values_name_the_field(change, message):
    arguments = {"python": PY, "launcher": "none", "hyperparameters": {}, **PATHS, **change}
    with pytest.raises(TrainingJobError) as error:
        build_training_command(**arguments)
    assert str(error.value).startswith(message), error.value


# -- real Slurm jobs on the local test bed ------------------------------------------------


@pytest.fixture(scope="module")
def site(testbed, tmp_path_factory):
    """site1 with the tiny model and the Italian corpus in its user's home."""
    from xffl_tasks.tiny import make_tiny

    facility = testbed.facility("site1")
    tiny = make_tiny(
        tmp_path_factory.mktemp("tiny-slurm") / "tiny",
        seed=0,
        train_documents=600,
        validation_documents=60,
    )
    home = Path(facility.home) / "training-job-test"
    shutil.copytree(tiny, home)
    subprocess.run(["chown", "-R", f"{facility.user}:{facility.user}", str(home)], check=True)
    try:
        yield facility, home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_job(
    facility, home: Path, name: str, sbatch: list[str], command: str, timeout: float = 480
) -> str:
    script = home / f"{name}.sh"
    script.write_text(
        "\n".join(["#!/bin/bash", *[f"#SBATCH {line}" for line in sbatch], "set -e", command, ""])
    )
    subprocess.run(["chown", f"{facility.user}:{facility.user}", str(script)], check=True)
    job_id = facility.ssh(
        f"sbatch --parsable --chdir={home} --output={home}/{name}-%j.out {script}"
    ).stdout.strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (
            facility.ssh(f"scontrol show -o job {job_id}").stdout.split("JobState=")[1].split()[0]
        )
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(2)
    facility.ssh(f"scancel {job_id}", check=False)
    logs = "".join(p.read_text() for p in home.glob(f"{name}-*.out"))
    raise AssertionError(
        f"training job {name} ({job_id}) still {state} after {timeout} s; its output:\n{logs[-6000:]}"
    )
@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "sbatch", "nproc", "expected"),
    [
        (
            "none",
            ["--ntasks=1", "--cpus-per-task=1"],
            1,
            {"world_size": 1, "launcher": "single", "threads": 1},
        ),
        (
            "srun",
            ["--ntasks=2", "--cpus-per-task=1"],
            1,
            {"world_size": 2, "launcher": "slurm", "parallelism": "ddp"},
        ),
        (
            "torchrun",
            ["--ntasks=1", "--cpus-per-task=2"],
            2,
            {"world_size": 2, "launcher": "torchrun", "threads": 1},
        ),
    ],
)
def test_the_command_trains_in_a_slurm_job(site, launcher, sbatch, nproc, expected):
    facility, home = site
    out = home / f"out-{launcher}"
    command = build_training_command(
        python=facility.python, launcher=launcher, model_dir=str(home / "model"), data_path=str(home / "data" / "italian"),
        out_dir=str(out), hyperparameters={"max_steps": 10, "learning_rate": 0.003, "batch_size": 4, "seq_len": 64},
        nproc_per_node=nproc,
    )  # fmt: skip
    state = run_job(
        facility,
        home,
        f"train-{launcher}",
        ["--partition=" + facility.partition, "--time=00:20:00", *sbatch],
        command,
    )
    logs = "".join(p.read_text() for p in home.glob(f"train-{launcher}-*.out"))
    assert state == "COMPLETED", logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert {key: metrics[key] for key in expected} == expected
    assert metrics["num_samples"] == 10 * 4 * expected["world_size"]
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert out.stat().st_uid == Path(facility.home).stat().st_uid  # written by the facility user
