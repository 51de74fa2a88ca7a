"""Validation of every value that reaches a facility's shell or an ``#SBATCH`` line.

Each check either returns the value (normalised) or raises ``SlurmInputError`` naming the
field. The rules are deliberately narrower than what Slurm accepts: a value that passes is safe
inside an ``#SBATCH`` line without quoting and inside a shell command once ``shlex.quote``-d.
Names and paths holding a line break or control character are refused first, with a message
that shows the character (``xffl_airflow.remote_text``): Slurm prints them back in lines we read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from xffl_airflow.remote_text import LINE_BREAKS, RemoteNameError, check_remote_name
from xffl_airflow.slurm.errors import SlurmInputError

# Job names: what squeue shows. No spaces, quotes or shell metacharacters.
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
# Partition, account and QOS names.
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
# A job id as squeue prints it: plain, array task (123_4) or het component (123+1).
JOB_ID_RE = re.compile(r"^[0-9]{1,12}(?:_[0-9]{1,9}|\+[0-9]{1,4})?$")
# Remote paths: absolute or relative to the login directory; no whitespace, quotes, $, `, ;, ~.
PATH_RE = re.compile(r"^[A-Za-z0-9_./@+=,-]+$")
# Output files may carry sbatch's filename patterns (%j, %x, ...).
OUTPUT_PATH_RE = re.compile(r"^[A-Za-z0-9_./@+=,%-]+$")
# Job comments (the task tag): run ids bring ':' and '~'.
COMMENT_RE = re.compile(r"^[A-Za-z0-9_./@+=,:~-]{1,1000}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Airflow ids as they may appear in the job tag (ASCII only: they reach Slurm).
AIRFLOW_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.~:+-]{1,250}$")
# Slurm time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
TIME_RE = re.compile(r"^(?:[0-9]+-)?[0-9]+(?::[0-9]+){0,2}$")
MEM_RE = re.compile(r"^[0-9]+[KMGT]?$")
NODES_RE = re.compile(r"^[1-9][0-9]{0,5}(?:-[1-9][0-9]{0,5})?$")
GPUS_RE = re.compile(r"^(?:[A-Za-z0-9_.-]{1,32}:)?[0-9]{1,4}$")


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise SlurmInputError(field, f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _name(value: object, field: str) -> str:
    """``value`` if it is a string that can travel to a facility and back in Slurm's output."""
    text = _text(value, field)
    try:
        return check_remote_name(text, field)
    except RemoteNameError as error:
        raise SlurmInputError(field, error.detail) from None


def _matching(value: object, field: str, pattern: re.Pattern[str], complaint: str) -> str:
    """``value`` if it is a string that ``pattern`` matches whole; else an error naming the
    field, whose message is ``complaint`` with ``{value}`` replaced by the value's repr."""
    text = _name(value, field)
    if not pattern.fullmatch(text):
        raise SlurmInputError(field, complaint.replace("{value}", repr(text)))
    return text


def check_job_name(value: object, field: str = "job_name") -> str:
    return _matching(value, field, JOB_NAME_RE, "{value} is not a safe job name: use 1-128 of "
                     "A-Z a-z 0-9 _ . + - (starting with a letter or digit)")  # fmt: skip


def check_slurm_name(value: object, field: str) -> str:
    return _matching(
        value, field, SLURM_NAME_RE, "{value} is not a valid name: use 1-64 of A-Z a-z 0-9 _ . + -"
    )


def check_job_id(value: object, field: str = "job_id") -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _matching(
        value, field, JOB_ID_RE, "{value} is not a Slurm job id (such as 123, 123_4 or 123+1)"
    )


def check_path(value: object, field: str, *, patterns: bool = False) -> str:
    """A remote path: absolute, or relative to the facility user's login directory."""
    text = _name(value, field)
    pattern = OUTPUT_PATH_RE if patterns else PATH_RE
    if not text or not pattern.fullmatch(text):
        allowed = "A-Z a-z 0-9 _ . / @ + = , -" + (" %" if patterns else "")
        raise SlurmInputError(field, f"{text!r} is not a safe remote path: use only {allowed}")
    if text.startswith("-"):
        raise SlurmInputError(field, f"{text!r} must not start with '-'")
    return text


def check_comment(value: object, field: str = "comment") -> str:
    return _matching(value, field, COMMENT_RE, "{value} is not a safe job comment: use 1-1000 "
                     "of A-Z a-z 0-9 _ . / @ + = , : ~ -")  # fmt: skip


def check_env(env: object, field: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise SlurmInputError(
            field, f"must be a mapping of variable names to strings, got {type(env).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
            raise SlurmInputError(f"{field}", f"{name!r} is not a valid environment variable name")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SlurmInputError(
                f"{field}.{name}", f"must be a string, got {type(value).__name__}"
            )
        text = str(value)
        if "\x00" in text:
            raise SlurmInputError(f"{field}.{name}", "must not contain NUL characters")
        checked[name] = text
    return checked


def check_shell_line(value: object, field: str) -> str:
    """One line of the user's own shell code (preamble, command): no NUL, no line breaks (any
    that ``str.splitlines`` honours: one line must stay one wherever the script is read)."""
    text = _text(value, field)
    if LINE_BREAKS.intersection(text):
        raise SlurmInputError(
            field, f"must be a single line without NUL characters, got {text[:200]!r}"
        )
    return text


def check_command(value: object, field: str = "command") -> str:
    """The job's command: the DAG author's shell code, placed in the batch script as written."""
    text = _text(value, field)
    if not text.strip():
        raise SlurmInputError(field, "must not be empty")
    if "\x00" in text:
        raise SlurmInputError(field, "must not contain NUL characters")
    return text


def check_airflow_key(value: object, field: str) -> str:
    return _matching(value, field, AIRFLOW_KEY_RE,
                     "{value} must be 1-250 of A-Z a-z 0-9 _ . - to be tagged on a Slurm job")  # fmt: skip


def check_run_id(value: object, field: str = "run_id") -> str:
    return _matching(value, field, RUN_ID_RE,
                     "{value} must be 1-250 of A-Z a-z 0-9 _ . ~ : + - to be tagged on a Slurm job")  # fmt: skip
