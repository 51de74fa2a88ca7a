"""Pure Slurm helpers: sbatch options and script rendering, shell command building, output
parsing, state mapping, validation. No I/O and no Airflow here; the hook runs what these build."""

from __future__ import annotations

from xffl_airflow.slurm.errors import SlurmInputError, SlurmOutputError
from xffl_airflow.slurm.options import SbatchOptions
from xffl_airflow.slurm.script import command_text, render_batch_script
from xffl_airflow.slurm.states import Phase, SlurmJob, phase_of
from xffl_airflow.slurm.tags import TaskTag, default_job_name

__all__ = [
    "Phase",
    "SbatchOptions",
    "SlurmInputError",
    "SlurmJob",
    "SlurmOutputError",
    "TaskTag",
    "command_text",
    "default_job_name",
    "phase_of",
    "render_batch_script",
]
