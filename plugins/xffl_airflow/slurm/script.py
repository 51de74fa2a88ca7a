"""Rendering the batch script of a job: one pure function, checked against a golden file.

The script records how the job ended in an *end record* beside its log (``<log>.end``, see
``end_record_path``), for clusters where Slurm forgets a job once it left the queue (no
accounting, short ``MinJobAge``). The record is one line, written to a temporary file and
renamed into place by an ``EXIT`` trap (a ``TERM`` trap covers ``scancel`` and the time limit:
Slurm sends TERM to the whole job, then KILL after ``KillWait``)::

    xffl-end 1 job=123 rc=3 signal= start=1767225600 end=1767225660 limit=129600

``rc`` is the job's exit status, ``signal`` ``TERM`` when the job was told to stop, ``start``
and ``end`` epoch seconds, ``limit`` the ``--time`` limit in seconds (empty when not set).
``end_records.parse_end_record`` reads it back.
"""

from __future__ import annotations

import re
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


END_RECORD_SUFFIX = ".end"
# --output patterns the script can fill in at run time (others: no end record is written)
_PATTERN_VARS = {"j": '"${SLURM_JOB_ID}"', "A": '"${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}"',
                 "a": '"${SLURM_ARRAY_TASK_ID}"'}  # fmt: skip
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def end_record_path(log_path: str | None) -> str | None:
    """The end record of the job whose (expanded) log is ``log_path``; None when unknown."""
    if not log_path or "%" in log_path:
        return None
    return log_path + END_RECORD_SUFFIX


def time_limit_seconds(time: str | None) -> int | None:
    """A Slurm ``--time`` (``30``, ``0:01``, ``2:00:00``, ``1-12``, ``1-12:00:00``) in seconds."""
    match = _TIME.match(str(time or "").strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # hours:minutes:seconds
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # minutes[:seconds]


def _end_record_word(output: str, job_name: str) -> str:
    """Shell text for the end record's path: the ``--output`` pattern filled in at run time,
    plus ``.end``; an empty word when the pattern holds a code the script cannot fill in."""
    words, literal, i = [], "", 0
    while i < len(output):
        if output[i] != "%":
            literal += output[i]
            i += 1
            continue
        code = output[i + 1 : i + 2]
        if code in ("%", "x"):
            literal += "%" if code == "%" else job_name
        elif code in _PATTERN_VARS:
            words += [shlex.quote(literal)] if literal else []
            words.append(_PATTERN_VARS[code])
            literal = ""
        else:
            return "''"
        i += 2
    words.append(shlex.quote(literal + END_RECORD_SUFFIX))
    return "".join(words)


def _end_record_lines(output: str, job_name: str, limit: int | None) -> list[str]:
    limit_word = str(int(limit)) if limit else "''"
    return [
        "# The job's end goes to an end record beside its log (see xffl_airflow.slurm.script).",
        f"xffl_end={_end_record_word(output, job_name)}",
        'xffl_start=$(date +%s) xffl_signal="" xffl_child=""',
        "xffl_record() {",
        "  xffl_rc=$?",
        "  trap - EXIT TERM",
        '  if [ -n "$xffl_end" ]; then',
        "    { printf 'xffl-end 1 job=%s rc=%s signal=%s start=%s end=%s limit=%s\\n' "
        f'"${{SLURM_JOB_ID:-}}" "$xffl_rc" "$xffl_signal" "$xffl_start" "$(date +%s)" {limit_word} '
        '>"$xffl_end.$$.tmp" && mv -f -- "$xffl_end.$$.tmp" "$xffl_end"; } 2>/dev/null || :',
        "  fi",
        "  # stopped by a signal: end by the same signal, so Slurm records it as such (0:15)",
        '  if [ "$xffl_signal" = TERM ]; then kill -TERM "$$"; fi',
        '  exit "$xffl_rc"',
        "}",
        'trap \'xffl_signal=TERM; [ -z "$xffl_child" ] || kill -TERM "$xffl_child" 2>/dev/null; exit 143\' TERM',
        "trap xffl_record EXIT",
        'if [ -n "$xffl_end" ]; then rm -f -- "$xffl_end"; fi',
    ]


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
    earlier output). ``set -e`` stops the job at the first failing preamble line. The command
    runs as a child the script waits for (so the ``TERM`` trap fires at once); its exit status
    is the job's. How the job ended is recorded in the end record (see the module docstring).
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
    ]
    lines += _end_record_lines(output, job_name, time_limit_seconds(options.time))
    lines += ["set -e"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines += list(options.preamble)
    lines += ["(", command.rstrip("\n"), ") &", "xffl_child=$!", 'wait "$xffl_child"', ""]
    return "\n".join(lines)
