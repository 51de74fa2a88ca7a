"""The Slurm operator's state between tries: the record in ``task_state_store`` (the submitted
job, whether its success was reported and by which try), which tries form one series (since
the last clear), and the tag that names the task instance on its job. Pure functions."""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import Context

from xffl_airflow.operators.slurm_results import SlurmConfigError
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.tags import TaskTag

STATE_KEY = "xffl_slurm_job"  # the task_state_store key holding the submitted job


def job_number(job_id: str) -> int:
    """The numeric part of a job id (``123`` of ``123_4``), for telling newer from older."""
    return int(re.match(r"\d+", job_id).group(0))


def first_try_of_series(ti: Any, retries: int | None) -> int | None:
    """The first try of the task instance's current series of tries: 1, or the try after the
    last clear (clearing sets ``max_tries`` to the try number then plus ``retries``). Airflow
    computes it the same way for sensor reschedules. None when the task instance does not say.
    """
    max_tries = getattr(ti, "max_tries", None)
    try_number = try_number_of(ti)
    if not isinstance(max_tries, int) or try_number is None or max_tries < 0:
        return None
    return series_start(try_number=try_number, max_tries=max_tries, retries=int(retries or 0))


def series_start(*, try_number: int, max_tries: int, retries: int) -> int | None:
    """``max_tries - retries + 1``, when that is a try at or before ``try_number``."""
    first = max_tries - retries + 1
    return first if 1 <= first <= try_number else None


def try_number_of(ti: Any) -> int | None:
    value = getattr(ti, "try_number", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def mark_reported(
    store: Any, job_id: str, cluster: str | None = None, try_number: int | None = None
) -> None:
    """Records in the store that ``job_id``'s success went to the task's result (XCom) in try
    ``try_number``, and the cluster it ran on when sbatch did not say."""
    stored = store.get(STATE_KEY) if store is not None else None
    if isinstance(stored, dict) and stored.get("job_id") == job_id:
        known = {"cluster": cluster} if cluster and not stored.get("cluster") else {}
        by = {"reported_try": try_number} if try_number is not None else {}
        store.set(STATE_KEY, {**stored, **known, "reported": True, **by})


def task_tag(context: Context, task_id: str) -> TaskTag:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    try:
        return TaskTag(
            ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index)
        )
    except SlurmInputError as error:
        raise SlurmConfigError(f"task {task_id}: cannot tag its Slurm job: {error}") from None
