"""The tag that ties a Slurm job to one Airflow task instance.

It goes into the job's ``--comment`` (``xffl/<dag_id>/<run_id>/<task_id>/<map_index>``) so a
retried or restarted task can find the job it already submitted, and the default job name
(``<dag_id>.<task_id>``) makes the job readable in ``squeue``. Every part is validated: the
tag is safe in an ``#SBATCH`` line and, quoted, in a shell.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.errors import SlurmInputError

TAG_PREFIX = "xffl"


@dataclass(frozen=True)
class TaskTag:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def __post_init__(self) -> None:
        v.check_airflow_key(self.dag_id, "dag_id")
        v.check_run_id(self.run_id, "run_id")
        v.check_airflow_key(self.task_id, "task_id")
        if (
            isinstance(self.map_index, bool)
            or not isinstance(self.map_index, int)
            or self.map_index < -1
        ):
            raise SlurmInputError("map_index", f"must be an int >= -1, got {self.map_index!r}")

    @property
    def comment(self) -> str:
        return f"{TAG_PREFIX}/{self.dag_id}/{self.run_id}/{self.task_id}/{self.map_index}"

    @classmethod
    def parse(cls, comment: str) -> TaskTag | None:
        """The tag in a job's comment, or None when the comment is not one of ours."""
        parts = (comment or "").strip().split("/")
        if len(parts) != 5 or parts[0] != TAG_PREFIX:
            return None
        try:
            return cls(parts[1], parts[2], parts[3], int(parts[4]))
        except (SlurmInputError, ValueError):
            return None


def default_job_name(dag_id: str, task_id: str, map_index: int = -1) -> str:
    """``<dag_id>.<task_id>[.<map_index>]``, shortened with a digest when too long for a name."""
    name = f"{dag_id}.{task_id}" + (f".{map_index}" if map_index >= 0 else "")
    if len(name) > 128:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:117]}-{digest}"
    if not name[0].isalnum():
        name = "j" + name[:127]
    return v.check_job_name(name)
