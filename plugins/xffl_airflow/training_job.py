"""The training line of a facility's batch script, built by pure functions.

The SlurmOperator writes the batch script (``#SBATCH`` lines, the facility's preamble of
module loads and exports); the line that trains comes from :func:`build_training_command`,
one command for every kind of allocation:

- ``launcher="none"``: one process where the batch script runs (one CPU node here, one GPU);
- ``launcher="srun"``: one task per GPU (or CPU slot) over the whole allocation; each task
  reads its rank from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` and the rendezvous
  from the first host of the node list (``xffl_tasks.launch``);
- ``launcher="torchrun"``: one ``torchrun`` per node (``srun --ntasks-per-node=1``), each
  starting ``nproc_per_node`` workers; the rendezvous is static, at the first node of the job,
  each torchrun's node rank its ``SLURM_NODEID`` (read in its own shell: ``TORCHRUN_NODE``).
  torchrun's ``c10d`` rendezvous backend is not used: its launcher unpickles the rendezvous
  state it reads from the store, and no pickle is ever loaded here.

Every value from the configuration is validated and ``shlex.quote``-d; the only unquoted
parts are fixed shell expressions over Slurm's own variables. The hyperparameters are checked
against the training task's own field table (``xffl_tasks.train.config``, which needs no
torch), so a misspelt or ill-typed one fails before any job is submitted.

The training task exits 2 on bad input (configuration, model folder, data), which a retry
cannot fix, and 1 when training itself failed (e.g. a non-finite loss).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Literal

from xffl_tasks.train.config import (
    FIELDS_BY_NAME,
    HYPERPARAMETERS,
    ROUND_PATH_FIELDS,
    ConfigError,
    from_mapping,
)

Launcher = Literal["none", "srun", "torchrun"]
LAUNCHERS: tuple[str, ...] = ("none", "srun", "torchrun")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NPROC_PER_NODE = 1024
# The rendezvous port when the hyperparameters name none: the same derivation from the job id
# as xffl_tasks.launch.slurm_master_port, so that two jobs sharing a node do not collide.
JOB_PORT = "$((15000 + SLURM_JOB_ID % 20000))"
FIRST_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
SRUN = ["srun", "--kill-on-bad-exit=1", "--export=ALL"]
# Each node's torchrun, started by srun: its node rank is that task's own SLURM_NODEID, so it is
# read by a shell of the task's (``$0`` is the Python, ``$@`` torchrun's arguments, as quoted).
TORCHRUN_NODE = shlex.quote('exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"')


class TrainingJobError(ValueError):
    """A value for the training command is invalid; the message names the field."""


def _path(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise TrainingJobError(f"{field}: must be a non-empty string, got {value!r}")
    if "\n" in value or "\0" in value:
        raise TrainingJobError(f"{field}: must be a single line without NUL characters")
    if not value.startswith("/"):
        raise TrainingJobError(f"{field}: must be an absolute path on the facility, got {value!r}")
    return value


def _python(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TrainingJobError(f"python: must be a non-empty string, got {value!r}")
    if "\n" in value or "\0" in value:
        raise TrainingJobError("python: must be a single line without NUL characters")
    return value


def _env(extra_env: Mapping[str, str] | None) -> list[str]:
    assignments = []
    for name, value in sorted((extra_env or {}).items()):
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise TrainingJobError(f"extra_env: {name!r} is not a valid environment variable name")
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            raise TrainingJobError(f"extra_env.{name}: must be a single-line string")
        assignments.append(f"{name}={shlex.quote(value)}")
    return assignments


def hyperparameter_arguments(hyperparameters: Mapping[str, object]) -> list[str]:
    """The training task's flags for ``hyperparameters`` (argv words, not yet quoted), in the
    task's own field order: ``{"learning_rate": 0.003, "seq_len": 64}`` ->
    ``["--learning-rate", "0.003", "--seq-len", "64"]``. A true boolean is ``--name``, a
    false one ``--no-name``, a null is left out (the task's default)."""
    try:
        values = from_mapping(hyperparameters, source="hyperparameters", allowed=HYPERPARAMETERS)
    except ConfigError as error:
        raise TrainingJobError(str(error)) from None
    words: list[str] = []
    for name in HYPERPARAMETERS:
        if name not in values or values[name] is None:
            continue
        value, flag = values[name], FIELDS_BY_NAME[name].flag
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    return words


def build_training_argv(
    *,
    model_dir: str,
    data_path: str,
    out_dir: str,
    hyperparameters: Mapping[str, object],
    adapter_dir: str | None = None,
    round_paths: Mapping[str, str] | None = None,
) -> list[str]:
    """``-m xffl_tasks.train --model ... --data ... --out ... [--adapter ...] [flags]`` (after
    the Python); with ``adapter_dir``, ``model_dir`` is the frozen base and the adapter trains.
    ``round_paths``: the round's other folders by training field (``stacked_update``,
    ``merged_base``, ``base_hashes``: a lora-stacked round's)."""
    adapter = ["--adapter", _path(adapter_dir, "adapter_dir")] if adapter_dir is not None else []
    extra: list[str] = []
    for name, value in sorted((round_paths or {}).items()):
        if name not in ROUND_PATH_FIELDS:
            raise TrainingJobError(f"round_paths: {name!r} is not one of {', '.join(ROUND_PATH_FIELDS)}")
        extra += [FIELDS_BY_NAME[name].flag, _path(value, name)]
    return [
        "-m",
        "xffl_tasks.train",
        "--model",
        _path(model_dir, "model_dir"),
        "--data",
        _path(data_path, "data_path"),
        "--out",
        _path(out_dir, "out_dir"),
        *adapter,
        *extra,
        *hyperparameter_arguments(hyperparameters),
    ]


def build_evaluation_argv(
    *,
    candidates: Mapping[str, str],
    data_path: str,
    out_dir: str,
    hyperparameters: Mapping[str, object],
    base_dir: str | None = None,
) -> list[str]:
    """``-m xffl_tasks.evaluate --candidate NAME=DIR ... [--base DIR] --data ... --out ...
    [flags]``: the final evaluation of named models (adapters on ``base_dir``) with the same
    data, split, seed and metrics as the rounds (the same hyperparameter flags)."""
    if not candidates:
        raise TrainingJobError("candidates: at least one model to evaluate")
    words = ["-m", "xffl_tasks.evaluate"]
    for name, folder in candidates.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise TrainingJobError(f"candidates: {name!r} is not a candidate name (1-64 of A-Z a-z 0-9 _ . -)")
        words += ["--candidate", f"{name}={_path(folder, f'candidates.{name}')}"]
    if base_dir is not None:
        words += ["--base", _path(base_dir, "base_dir")]
    return [*words, "--data", _path(data_path, "data_path"), "--out", _path(out_dir, "out_dir"),
            *hyperparameter_arguments(hyperparameters)]  # fmt: skip


def build_training_command(
    *,
    python: str,
    launcher: Launcher,
    model_dir: str,
    data_path: str,
    out_dir: str,
    hyperparameters: Mapping[str, object],
    nproc_per_node: int = 1,
    extra_env: Mapping[str, str] | None = None,
    adapter_dir: str | None = None,
    round_paths: Mapping[str, str] | None = None,
) -> str:
    """The one shell line that trains, for ``launcher`` ``none``, ``srun`` or ``torchrun``.

    ``nproc_per_node`` (workers per node) is for ``torchrun`` only; ``extra_env`` becomes
    ``NAME=value`` assignments in front of the command (``srun`` passes them to every task).
    """
    argv = build_training_argv(model_dir=model_dir, data_path=data_path, out_dir=out_dir,
                               hyperparameters=hyperparameters, adapter_dir=adapter_dir, round_paths=round_paths)  # fmt: skip
    return launch_command(python=python, launcher=launcher, task_argv=argv, nproc_per_node=nproc_per_node,
                          extra_env=extra_env, master_port=hyperparameters.get("master_port"))  # fmt: skip


def launch_command(
    *,
    python: str,
    launcher: Launcher,
    task_argv: list[str],
    nproc_per_node: int = 1,
    extra_env: Mapping[str, str] | None = None,
    master_port: object = None,
) -> str:
    """``python task_argv...`` as one shell line, launched as ``launcher`` says (every word
    quoted; only fixed expressions over Slurm's own variables are not)."""
    if launcher not in LAUNCHERS:
        raise TrainingJobError(f"launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if (
        isinstance(nproc_per_node, bool)
        or not isinstance(nproc_per_node, int)
        or not 1 <= nproc_per_node <= MAX_NPROC_PER_NODE
    ):
        raise TrainingJobError(
            f"nproc_per_node: must be a whole number from 1 to {MAX_NPROC_PER_NODE}, got {nproc_per_node!r}"
        )
    if launcher != "torchrun" and nproc_per_node != 1:
        raise TrainingJobError(
            f"nproc_per_node: {nproc_per_node} is for launcher torchrun; with {launcher!r} the "
            "allocation's tasks (sbatch ntasks_per_node) set the processes"
        )
    python = shlex.quote(_python(python))
    task = " ".join(shlex.quote(word) for word in task_argv)
    words = _env(extra_env)
    if launcher == "none":
        words += [python, task]
    elif launcher == "srun":
        words += [*SRUN, python, task]
    else:
        port_text = str(int(master_port)) if master_port is not None else JOB_PORT
        words += [
            *SRUN,
            '--nodes="$SLURM_JOB_NUM_NODES"',
            '--ntasks="$SLURM_JOB_NUM_NODES"',
            "--ntasks-per-node=1",
            "sh",
            "-c",
            TORCHRUN_NODE,
            python,
            '--nnodes="$SLURM_JOB_NUM_NODES"',
            f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=static",
            f'--master-addr="{FIRST_NODE}"',
            f"--master-port={port_text}",
            task,
        ]
    return " ".join(words)


def stacked_base_cleanup(folder: str, keep: str) -> str:
    """Removes a facility's merged bases of earlier rounds (lora-stacked), keeping ``keep``:
    run after a round's training succeeded (its merged base is the next round's input)."""
    if not re.fullmatch(r"round-[0-9]{4,}", keep):
        raise TrainingJobError(f"keep: {keep!r} is not a round folder name")
    return (f"find {shlex.quote(_path(folder, 'folder'))} -mindepth 1 -maxdepth 1 -name 'round-*' "
            f"! -name {shlex.quote(keep)} -exec rm -rf -- {{}} +")  # fmt: skip
