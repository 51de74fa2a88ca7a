"""Building the shell text that runs at a facility. Pure functions; every value is validated and
``shlex.quote``-d.

Queries are small ``sh`` scripts sent on the standard input of one SSH command (``sh -s``), so
nothing but a constant ever sits on the SSH command line and the job list can be long. Their
output is framed by ``@@xffl`` marker lines that ``parsing.parse_sections`` reads back:

    @@xffl tz +0100                         the facility's UTC offset (Slurm prints local times)
    @@xffl begin squeue [ARG]               a command's combined output follows ...
    @@xffl end RC                           ... and its exit status
    @@xffl log KEY SIZE OFFSET COUNT        then one line: COUNT bytes of the log from OFFSET, base64
    @@xffl tail JOB                         then one line: the last lines of JOB's log, base64
    @@xffl begin end JOB                    a job's end record (``script.end_record_path``), base64

What a job writes (its log) travels only base64-encoded, on one line after its marker: a job
whose log holds ``@@xffl`` lines cannot end a section early, hide its own last lines, or forge
another job's answer in the same output.

Every command runs in the facility's login environment (``FacilityLogin``: the config's
``login_preamble`` lines, then ``slurm_bin`` first on the PATH), see ``build_login_command``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.login import FacilityLogin

MARK = "@@xffl"
FIELD_SEP = "\x1f"  # ASCII unit separator: cannot appear in names, paths or comments we print

# squeue --Format fields, in the order parsing.parse_squeue reads them. Free text goes last.
SQUEUE_FIELDS = (
    "JobArrayID", "JobID", "State", "Reason", "exit_code", "SubmitTime", "StartTime", "EndTime",
    "Cluster", "Name", "STDOUT", "Comment",
)  # fmt: skip
SACCT_FIELDS = (
    "JobID", "JobIDRaw", "State", "ExitCode", "Reason", "Submit", "Start", "End", "Cluster", "JobName", "Comment",
)  # fmt: skip
# Longest log slice read per job and poll; the rest comes with the next poll.
DEFAULT_LOG_CHUNK = 256 * 1024
# Longest log tail read per job (the last lines, cut to this many bytes).
MAX_TAIL = 64 * 1024
# Longest end record read (a real one is under 100 bytes; longer ones are refused unread).
MAX_END_RECORD = 256

_LOG_FUNCTION = f"""xffl_log() {{
  s=$(stat -c %s -- "$2" 2>/dev/null) || s=-1
  o=$3
  if [ "$s" -ge 0 ] && [ "$s" -lt "$o" ]; then o=0; fi
  n=0
  if [ "$s" -gt "$o" ]; then n=$((s - o)); fi
  if [ "$n" -gt "$4" ]; then n=$4; fi
  printf '{MARK} log %s %s %s %s\\n' "$1" "$s" "$o" "$n"
  if [ "$n" -gt 0 ]; then tail -c +$((o + 1)) -- "$2" 2>/dev/null | head -c "$n" | base64 -w 0; fi
  printf '\\n'
}}"""

# The last lines of a log: "$1" the job id, "$2" the lines, "$3" the file. tail's errors (a
# missing file) are dropped: that file's data line is empty, as for an empty log.
_TAIL_FUNCTION = f"""xffl_tail() {{
  printf '{MARK} tail %s\\n' "$1"
  {{ tail -n "$2" -- "$3" | tail -c {MAX_TAIL}; }} 2>/dev/null | base64 -w 0
  printf '\\n'
}}"""


READ_KEY_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


@dataclass(frozen=True)
class LogRead:
    """Read up to ``max_bytes`` of ``path`` from byte ``offset``; the answer is filed under ``key``."""

    key: str
    path: str
    offset: int = 0
    max_bytes: int = DEFAULT_LOG_CHUNK


def _read_key(key: str) -> str:
    if not isinstance(key, str) or not READ_KEY_RE.fullmatch(key):
        raise v.SlurmInputError(
            "log_reads.key", f"{key!r} is not a read key (1-64 of A-Z a-z 0-9 _ . + -)"
        )
    return key


def squeue_format() -> str:
    return ",".join(f"{name}:{FIELD_SEP}" for name in SQUEUE_FIELDS)


def _section(name: str, command: str, arg: str | None = None) -> str:
    header = f"{name} {arg}" if arg else name
    return f"printf '{MARK} begin %s\\n' {shlex.quote(header)}\n{command} 2>&1\nxffl_rc=$?\nprintf '\\n{MARK} end %s\\n' \"$xffl_rc\"\n"


def _tz() -> str:
    return f"printf '{MARK} tz %s\\n' \"$(date +%z)\"\n"


def _job_list(job_ids: Iterable[str]) -> str:
    ids = [v.check_job_id(job_id) for job_id in job_ids]
    if not ids:
        raise v.SlurmInputError("job_ids", "must name at least one job")
    return ",".join(dict.fromkeys(ids))


def build_squeue_command(job_ids: Iterable[str]) -> str:
    """``squeue`` for these jobs, in every state it still remembers (``-t all``)."""
    return f"squeue -h -t all -j{shlex.quote(_job_list(job_ids))} -O {shlex.quote(squeue_format())}"


def build_poll_script(job_ids: Sequence[str], log_reads: Sequence[LogRead] = ()) -> str:
    """One poll of a facility: its UTC offset, squeue for every watched job, then new log bytes.

    The logs are read after squeue answered: a job squeue saw as ended has its whole log there.
    """
    parts = [_tz()]
    if job_ids:
        parts.append(_section("squeue", build_squeue_command(job_ids)))
    if log_reads:
        parts.append(_LOG_FUNCTION + "\n")
        for read in log_reads:
            if read.offset < 0 or read.max_bytes <= 0:
                raise v.SlurmInputError(
                    "log_reads", f"bad offset {read.offset} or size {read.max_bytes}"
                )
            parts.append(
                f"xffl_log {shlex.quote(_read_key(read.key))} "
                f"{shlex.quote(v.check_path(read.path, 'log_path', patterns=True))} {int(read.offset)} {int(read.max_bytes)}\n"
            )
    return "".join(parts)


def build_resolve_script(
    job_ids: Sequence[str], end_records: Mapping[str, str] | None = None
) -> str:
    """For jobs that left squeue: ``sacct``, then ``sacct -c`` (the completion log) where
    accounting storage is disabled, then ``scontrol show job`` for each, then the end record
    (at most ``MAX_END_RECORD + 1`` bytes, base64) of each job in ``end_records`` (id: path)."""
    ids = _job_list(job_ids)
    fields = ",".join(SACCT_FIELDS)
    sacct = f"sacct -X -n -P --delimiter={shlex.quote(FIELD_SEP)} -j {shlex.quote(ids)} -o {fields}"
    sacct_c = (
        f"sacct -c -n -P --delimiter={shlex.quote(FIELD_SEP)} -j {shlex.quote(ids)} -o {fields}"
    )
    parts = [_tz(), _section("sacct", sacct)]
    parts.append(f'if [ "$xffl_rc" -ne 0 ]; then\n{_section("sacct-c", sacct_c)}fi\n')
    for job_id in ids.split(","):
        parts.append(_section("scontrol", f"scontrol show -o job {shlex.quote(job_id)}", job_id))
    for job_id, path in sorted((end_records or {}).items()):
        if job_id in ids.split(","):
            path = shlex.quote(v.check_path(path, "end_record"))
            read = f"test -f {path} && head -c {MAX_END_RECORD + 1} -- {path} | base64 -w 0"
            parts.append(_section("end", read, job_id))
    return "".join(parts)


def build_find_script(job_name: str, *, days: int = 7) -> str:
    """The user's jobs named ``job_name``: squeue (any remembered state), then sacct over ``days``."""
    name = shlex.quote(v.check_job_name(job_name))
    fields = ",".join(SACCT_FIELDS)
    squeue = f"squeue -h -t all --me -n {name} -O {shlex.quote(squeue_format())}"
    sacct = f"sacct -X -n -P --delimiter={shlex.quote(FIELD_SEP)} --name={name} -S now-{int(days)}days -o {fields}"
    return _tz() + _section("squeue", squeue) + _section("sacct", sacct)


def build_tail_script(reads: Sequence[tuple[str, str]], lines: int) -> str:
    """The last ``lines`` lines (at most ``MAX_TAIL`` bytes) of each ``(job_id, log_path)``:
    ``@@xffl tail JOB``, then one line of base64 (``parsing.Output.tails``)."""
    if lines <= 0:
        raise v.SlurmInputError("log_tail_lines", f"must be positive, got {lines}")
    parts = [_TAIL_FUNCTION + "\n"]
    for job_id, path in reads:
        job_id = v.check_job_id(job_id)
        path = shlex.quote(v.check_path(path, "log_path", patterns=True))
        parts.append(f"xffl_tail {shlex.quote(job_id)} {int(lines)} {path}\n")
    return "".join(parts)


def build_workdir_command(workdir: str) -> str:
    """Creates ``workdir`` (relative paths are under the login directory) and prints it absolute."""
    path = shlex.quote(v.check_path(workdir, "remote_workdir"))
    return f"mkdir -p -- {path} && cd -- {path} && pwd -P"


def build_submit_command(workdir: str, script_name: str) -> str:
    """Writes the batch script (on stdin) aside, renames it into ``workdir``, submits it.

    ``workdir`` must be absolute (see ``build_workdir_command``). sbatch prints ``ID[;CLUSTER]``.
    """
    workdir = v.check_path(workdir, "remote_workdir")
    if not workdir.startswith("/"):
        raise v.SlurmInputError("remote_workdir", f"{workdir!r} must be absolute here")
    script_name = v.check_job_name(script_name, "script_name")
    final = shlex.quote(f"{workdir.rstrip('/')}/{script_name}")
    pattern = shlex.quote(f"{workdir.rstrip('/')}/.{script_name}.XXXXXX")
    return (
        f'mkdir -p -- {shlex.quote(workdir)} && xffl_tmp=$(mktemp -- {pattern}) && cat > "$xffl_tmp" '
        f'&& mv -f -- "$xffl_tmp" {final} && sbatch --parsable -- {final}'
    )


def build_cancel_command(job_id: str) -> str:
    return f"scancel {shlex.quote(v.check_job_id(job_id))}"


def build_login_command(command: str, login: FacilityLogin | None) -> str:
    """``command`` after the login preamble and with ``slurm_bin`` first on the PATH.

    The preamble runs in the command's shell (its exports hold for the command), its stdin
    closed (a ``sh -s`` script on stdin is the command's) and its stdout sent to stderr (the
    command's stdout is what we parse).
    """
    if not login:
        return command
    parts = []
    if login.preamble:
        parts.append("{\n" + "\n".join(login.preamble) + "\n} </dev/null >&2\n")
    if login.slurm_bin:
        parts.append(f'PATH={shlex.quote(login.slurm_bin)}:"$PATH"; export PATH\n')
    return "".join(parts) + command
