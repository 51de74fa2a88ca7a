"""Rendering the batch script of a job: one pure function, checked against a golden file."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.options import SbatchOptions


def command_text(command: str | Sequence[str], field: str = "command") -> str:
    """The job's command as shell text: a string as written, an argv list quoted word by word."""
    if isinstance(command, str):
        return v.check_command(command, field)
    if isinstance(command, Sequence) and command and all(isinstance(word, str) for word in command):
        for i, word in enumerate(command):
            if "\x00" in word:
                v.check_command(word, f"{field}[{i}]")
        return shlex.join(command)
    raise v.SlurmInputError(
        field, "must be a shell command string or a non-empty list of strings (argv)"
    )


def render_batch_script(
    options: SbatchOptions,
    *,
    command: str,
    job_name: str,
    comment: str,
    workdir: str,
    output: str,
    env: Mapping[str, str],
) -> str:
    """The batch script: ``#SBATCH`` lines, exported environment, the preamble, the command.

    Every ``#SBATCH`` value is validated (no quoting needed there); environment values are
    ``shlex.quote``-d; the preamble and command are the DAG author's own shell code, placed as
    written. stdout and stderr both go to ``output``, appended to (a requeued job keeps its
    earlier output). ``set -e`` stops the job at the first failing preamble line.
    """
    job_name = v.check_job_name(job_name)
    comment = v.check_comment(comment)
    workdir = v.check_path(workdir, "workdir")
    output = v.check_path(output, "output", patterns=True)
    env = v.check_env(env)
    command = v.check_command(command)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --comment={comment}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={output}",
        "#SBATCH --open-mode=append",
    ]
    lines += [f"#SBATCH {option}" for option in options.sbatch_options()]
    lines += [
        "# Written by xffl-airflow: the lines above are sbatch options, the lines below run in the job.",
        "set -e",
    ]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines += list(options.preamble)
    lines += [command.rstrip("\n"), ""]
    return "\n".join(lines)
