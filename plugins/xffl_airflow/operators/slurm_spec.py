"""What a Slurm operator's fields render to: its validated job settings. Pure functions.

Fields that hold no Jinja are checked when the DAG is parsed (``check_untemplated``); all of
them once rendered, before anything reaches a facility (``job_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.options import SbatchOptions
from xffl_airflow.slurm.script import command_text
from xffl_airflow.slurm.tags import TaskTag, default_job_name


@dataclass(frozen=True)
class JobSpec:
    """The operator's rendered, validated settings."""

    options: SbatchOptions
    command: str
    env: dict[str, str]
    workdir: str
    job_name: str


def templated(value: Any) -> bool:
    """Whether ``value`` still holds Jinja (then it is validated after rendering)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(templated(k) or templated(x) for k, x in value.items())
    if isinstance(value, (list, tuple)):
        return any(templated(x) for x in value)
    return False



def check_untemplated(*, sbatch: Any, command: Any, remote_workdir: Any, job_name: Any, env: Any) -> None:
    """Checks what holds no Jinja; ``SlurmInputError`` naming the field otherwise."""
    if not templated(sbatch):
        SbatchOptions.from_dict(sbatch)
    if not templated(command):
        command_text(command)
    if not templated(remote_workdir):
        v.check_path(remote_workdir, "remote_workdir")
    if job_name is not None and not templated(job_name):
        v.check_job_name(job_name)
    if not templated(env):
        v.check_env(env)


def job_spec(*, sbatch: Any, command: Any, remote_workdir: Any, job_name: Any, env: Any, tag: TaskTag) -> JobSpec:
    """The rendered fields, validated; the job name defaults to the task's (``default_job_name``)."""
    return JobSpec(
        options=SbatchOptions.from_dict(sbatch),
        command=command_text(command),
        env=v.check_env(env),
        workdir=v.check_path(remote_workdir, "remote_workdir"),
        job_name=v.check_job_name(job_name) if job_name else default_job_name(tag.dag_id, tag.task_id, tag.map_index),
    )
