"""Reading what Slurm printed. Pure functions, tested on literal command output.

An answer is a list of ``SlurmJob`` records, or None when the query failed (controller down,
command missing, garbage): None means "ask again", never "the job failed".

Output is split on ``"\n"`` only: the other separators ``str.splitlines`` honours (``\x1c``,
``\x85``, U+2028, ...) may sit inside a field a user controls. A line that cannot be read (a bad
``@@xffl`` marker, a short squeue or sacct row) is recorded in ``Output.malformed`` and skipped,
so one bad line costs one job one answer, never the whole facility's poll.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from xffl_airflow.remote_text import split_lines
from xffl_airflow.slurm.commands import (
    FIELD_SEP,
    MARK,
    SACCT_FIELDS,
    SQUEUE_FIELDS,
)
from xffl_airflow.slurm.errors import SlurmOutputError
from xffl_airflow.slurm.states import SlurmJob, exit_code_from_wait_status, normalize_state

# What squeue/scontrol print for a job id they do not hold (purged after MinJobAge): a real answer.
INVALID_JOB_ID = "Invalid job id specified"
_NULLS = {"", "(null)", "N/A", "NONE", "None", "Unknown", "n/a"}
_SBATCH_ID = re.compile(r"^([0-9]+)(?:;(\S+))?$")
_TZ = re.compile(r"^[+-][0-9]{4}$")
# ASCII digits only: int() also takes "+1", " 1", "1_0" and digits of other scripts.
_INT = re.compile(r"-?[0-9]{1,19}")
MAX_QUOTED = 200  # a malformed line is kept up to this many characters
MAX_TAIL_LINE = 4000  # a log tail's line is cut to this many characters (as the poller cuts)


@dataclass(frozen=True)
class Malformed:
    """A line of a facility's output that could not be read, and was skipped.

    :param kind: what it should have been: ``marker`` (an ``@@xffl`` line), ``log`` (a log
        chunk's header or data), ``tail`` (a log tail's header or data), ``squeue``, ``sacct``
    :param line: the line as received, cut to ``MAX_QUOTED`` characters (show it with repr)
    """

    kind: str
    line: str


@dataclass
class Section:
    name: str
    arg: str | None
    text: str
    rc: int | None  # None: the section never ended (the script was cut off)


@dataclass
class LogChunk:
    key: str
    size: int  # the file's size when read; -1 when it did not exist (yet)
    offset: int  # where this chunk starts (0 again when the file had shrunk)
    data: bytes

    @property
    def next_offset(self) -> int:
        return self.offset + len(self.data)


@dataclass
class Output:
    tz: str | None = None
    sections: list[Section] = field(default_factory=list)
    logs: dict[str, LogChunk] = field(default_factory=dict)
    tails: dict[str, bytes] = field(default_factory=dict)  # job id: the log's last lines
    malformed: list[Malformed] = field(default_factory=list)

    def section(self, name: str, arg: str | None = None) -> Section | None:
        for section in self.sections:
            if section.name == name and section.arg == arg:
                return section
        return None


def parse_sections(data: bytes | str) -> Output:
    """Splits the output of a script from ``commands`` into its marked parts.

    Never raises: a marker line that cannot be read is recorded in ``malformed`` and skipped
    (a log chunk with a bad header or bad base64 is left out, so its reader asks again; so is
    a log tail). Log bytes travel only as base64 (``log`` and ``tail`` data lines), so nothing
    a job writes can read as a marker.
    """
    if isinstance(data, str):
        data = data.encode(errors="surrogateescape")
    out = Output()
    lines = data.split(b"\n")
    i = 0
    current: Section | None = None
    body: list[str] = []

    def malformed(kind: str, line: str | bytes) -> None:
        if isinstance(line, bytes):
            line = line.decode(errors="replace")
        out.malformed.append(Malformed(kind, line[:MAX_QUOTED]))

    while i < len(lines):
        raw = lines[i]
        line = raw.decode(errors="replace")
        i += 1
        if not line.startswith(MARK + " "):
            if current is not None:
                body.append(line)
            continue
        words = line.split(" ")  # printf writes single spaces; split() would also cut at U+2028
        kind = words[1]
        if kind == "tz" and len(words) == 3 and _TZ.match(words[2]):
            out.tz = words[2]
        elif kind == "begin" and len(words) in (3, 4) and all(words[2:]):
            current = Section(words[2], words[3] if len(words) > 3 else None, "", None)
            body = []
        elif kind == "end" and current is not None:
            current.text = "\n".join(body).strip("\n")
            current.rc = int(words[2]) if len(words) == 3 and _INT.fullmatch(words[2]) else None
            if current.rc is None:
                malformed("marker", line)
            out.sections.append(current)
            current = None
        elif kind == "log":
            numbers = words[3:]
            if (
                len(words) != 6
                or not words[2]
                or not all(_INT.fullmatch(n) for n in numbers)
                or int(numbers[0]) < -1
                or int(numbers[1]) < 0
                or int(numbers[2]) < 0
            ):
                malformed("log", line)
                continue
            key, size, offset, count = words[2], int(words[3]), int(words[4]), int(words[5])
            if i >= len(lines):  # cut off before the data: no chunk, ask again
                break
            chunk, i = _data_line(lines, i, "log", line, malformed)
            if chunk is not None:
                out.logs[key] = LogChunk(key, size, offset, chunk[:count])
        elif kind == "tail":
            if len(words) != 3 or not words[2]:
                malformed("tail", line)
                continue
            if i >= len(lines):  # cut off before the data: no tail
                break
            data, i = _data_line(lines, i, "tail", line, malformed)
            if data is not None:
                out.tails[words[2]] = data
        else:
            malformed("marker", line)
    if current is not None:  # cut off mid-section: keep what came, without an exit status
        current.text = "\n".join(body).strip("\n")
        out.sections.append(current)
    return out


def _data_line(
    lines: list[bytes], i: int, kind: str, header: str, malformed
) -> tuple[bytes | None, int]:
    """The base64 line at ``lines[i]`` after a ``kind`` marker ``header``, decoded, and the
    index of the next line; None (recorded in ``malformed``) when it is missing or not base64."""
    encoded = lines[i]
    if encoded.startswith(MARK.encode()):  # the data line is missing: a marker follows
        malformed(kind, header)
        return None, i
    try:
        return base64.b64decode(encoded, validate=True), i + 1
    except ValueError:
        malformed(kind, encoded)
        return None, i + 1


def tail_lines(data: bytes, lines: int, *, max_line: int = MAX_TAIL_LINE) -> list[str]:
    """The last ``lines`` non-blank lines of a log tail (``Output.tails``), split on ``"\\n"``
    only, each without its ``"\\r"`` and cut to ``max_line`` characters."""
    if lines <= 0:
        return []
    text = data.decode(errors="replace")
    kept = []
    for line in split_lines(text):
        line = line.rstrip("\r")
        if line.strip():
            kept.append(line if len(line) <= max_line else line[:max_line] + " [...]")
    return kept[-lines:]


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text in _NULLS else text


def _short_row(
    kind: str,
    line: str,
    cells: list[str],
    fields: tuple[str, ...],
    malformed: list[Malformed] | None,
) -> None:
    """A row with too few fields: recorded in ``malformed`` when given (and skipped), else raised."""
    if malformed is None:
        raise SlurmOutputError(
            f"{kind} printed {len(cells)} fields, expected {len(fields)}: {line[:MAX_QUOTED]!r}"
        )
    malformed.append(Malformed(kind, line[:MAX_QUOTED]))


def parse_squeue(text: str, *, malformed: list[Malformed] | None = None) -> list[SlurmJob]:
    """Rows of ``squeue -O`` with ``commands.SQUEUE_FIELDS``, each field ended by FIELD_SEP.

    A row with too few fields raises ``SlurmOutputError``, or, when ``malformed`` is given, is
    recorded there and skipped.
    """
    jobs = []
    for line in split_lines(text):
        if FIELD_SEP not in line:
            continue
        cells = line.split(FIELD_SEP)
        if len(cells) < len(SQUEUE_FIELDS):
            _short_row("squeue", line, cells, SQUEUE_FIELDS, malformed)
            continue
        row = dict(zip(SQUEUE_FIELDS, cells))
        jobs.append(
            SlurmJob(
                job_id=row["JobArrayID"].strip(),
                raw_id=_value(row["JobID"]),
                state=normalize_state(row["State"]),
                exit_code=exit_code_from_wait_status(row["exit_code"]),
                reason=_value(row["Reason"]),
                submit_time=_time(row["SubmitTime"]),
                start_time=_time(row["StartTime"]),
                end_time=_time(row["EndTime"]),
                cluster=_value(row["Cluster"]),
                name=_value(row["Name"]),
                stdout=expand_output_path(
                    _value(row["STDOUT"]),
                    job_id=row["JobArrayID"].strip(),
                    raw_id=_value(row["JobID"]),
                    job_name=_value(row["Name"]),
                ),
                comment=_value(row["Comment"]),
                source="squeue",
            )
        )
    return jobs


def parse_sacct(
    text: str, *, source: str = "sacct", malformed: list[Malformed] | None = None
) -> list[SlurmJob]:
    """Rows of ``sacct -n -P --delimiter=FIELD_SEP -o SACCT_FIELDS`` (``sacct -c`` too).

    A job listed twice (requeued) keeps its last row. A row with too few fields: as in
    ``parse_squeue``.
    """
    by_id: dict[str, SlurmJob] = {}
    for line in split_lines(text):
        if FIELD_SEP not in line:
            continue
        cells = line.split(FIELD_SEP)
        if len(cells) < len(SACCT_FIELDS):
            _short_row("sacct", line, cells, SACCT_FIELDS, malformed)
            continue
        row = dict(zip(SACCT_FIELDS, cells))
        job_id = row["JobID"].strip()
        if not job_id or "." in job_id:  # steps (123.batch) when -X was not honoured
            continue
        exit_code = _value(row["ExitCode"])
        by_id[job_id] = SlurmJob(
            job_id=job_id,
            raw_id=_value(row["JobIDRaw"]),
            state=normalize_state(row["State"]),
            exit_code=exit_code,
            reason=_value(row["Reason"]),
            submit_time=_time(row["Submit"]),
            start_time=_time(row["Start"]),
            end_time=_time(row["End"]),
            cluster=None if _value(row["Cluster"]) == "unknown" else _value(row["Cluster"]),
            name=_value(row["JobName"]),
            comment=_value(row["Comment"]),
            source=source,
        )
    return list(by_id.values())


def parse_scontrol(text: str) -> list[SlurmJob]:
    """``scontrol show -o job ID``: one line of ``Key=Value`` pairs per job (array task, het part)."""
    jobs = []
    for line in split_lines(text):
        if not line.startswith("JobId="):
            continue
        pairs = _key_values(line)
        raw = pairs.get("JobId", "")
        if pairs.get("ArrayJobId") and pairs.get("ArrayTaskId"):
            job_id = f"{pairs['ArrayJobId']}_{pairs['ArrayTaskId']}"
        elif pairs.get("HetJobId") and pairs.get("HetJobOffset"):
            job_id = f"{pairs['HetJobId']}+{pairs['HetJobOffset']}"
        else:
            job_id = raw
        jobs.append(
            SlurmJob(
                job_id=job_id,
                raw_id=raw,
                state=normalize_state(pairs.get("JobState")),
                exit_code=_value(pairs.get("ExitCode")),
                reason=_value(pairs.get("Reason")),
                submit_time=_time(pairs.get("SubmitTime")),
                start_time=_time(pairs.get("StartTime")),
                end_time=_time(pairs.get("EndTime")),
                cluster=_value(pairs.get("ClusterName") or pairs.get("Cluster")),
                name=_value(pairs.get("JobName")),
                comment=_value(pairs.get("Comment")),
                stdout=expand_output_path(
                    _value(pairs.get("StdOut")),
                    job_id=job_id,
                    raw_id=raw,
                    job_name=_value(pairs.get("JobName")),
                ),
                source="scontrol",
            )
        )
    return jobs


# Keys of `scontrol show -o job` whose values may hold spaces: take them up to the next key.
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:]*)=")


def _key_values(line: str) -> dict[str, str]:
    matches = list(_KEY.finditer(line))
    pairs = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        pairs[match.group(1)] = line[match.end() : end].strip()
    return pairs


def expand_output_path(pattern: str | None, *, job_id: str, raw_id: str | None = None,
                       job_name: str | None = None) -> str | None:  # fmt: skip
    """The log file behind an ``--output`` pattern as squeue and scontrol print it: ``%j`` (the
    raw job id), ``%x``, ``%A``, ``%a``, ``%%`` filled in; None when another pattern remains."""
    if not pattern:
        return None
    master, _, task = job_id.partition("_")
    master = master.partition("+")[0]
    values = {"j": raw_id or master, "x": job_name, "A": master, "a": task or None, "%": "%"}
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            value = values.get(pattern[i + 1])
            if not value:
                return None
            out.append(value)
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def _time(text: str | None) -> str | None:
    value = _value(text)
    if value is None or not value[:1].isdigit():
        return None
    return value


def parse_sbatch(stdout: str) -> tuple[str, str | None]:
    """``sbatch --parsable`` prints ``ID`` or ``ID;CLUSTER`` (possibly after warnings)."""
    for line in reversed(split_lines(stdout.strip())):
        match = _SBATCH_ID.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    raise SlurmOutputError(f"sbatch --parsable printed no job id: {stdout.strip()[-500:]!r}")


def sbatch_error(stderr: str) -> str:
    """The reasons in sbatch's error output, joined: "invalid partition specified: nope;
    Batch job submission failed: Invalid partition name specified"."""
    lines = [line.strip() for line in split_lines(stderr.strip()) if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    if errors:
        return "; ".join(errors)
    return lines[-1] if lines else "no error message"


def squeue_answer(
    section: Section | None, *, malformed: list[Malformed] | None = None
) -> list[SlurmJob] | None:
    """squeue's records, [] when it holds none of the jobs, None when the query failed.

    Without ``malformed`` one short row makes the whole answer None; with it (a poll of many
    jobs), the row is recorded there and skipped, and the other rows count.
    """
    if section is None or section.rc is None:
        return None
    if section.rc != 0:
        return [] if INVALID_JOB_ID in section.text else None
    try:
        return parse_squeue(section.text, malformed=malformed)
    except SlurmOutputError:
        return None


def sacct_answer(
    section: Section | None, *, source: str = "sacct", malformed: list[Malformed] | None = None
) -> list[SlurmJob] | None:
    """sacct's records, None when the query failed; ``malformed`` as in ``squeue_answer``."""
    if section is None or section.rc is None or section.rc != 0:
        return None
    try:
        return parse_sacct(section.text, source=source, malformed=malformed)
    except SlurmOutputError:
        return None


def scontrol_answer(section: Section | None) -> list[SlurmJob] | None:
    if section is None or section.rc is None:
        return None
    if section.rc != 0:
        return [] if INVALID_JOB_ID in section.text else None
    return parse_scontrol(section.text)


def tz_offset_seconds(tz: str | None) -> int | None:
    """``"+0130"`` -> 5400."""
    if not tz or not _TZ.match(tz):
        return None
    sign = -1 if tz[0] == "-" else 1
    return sign * (int(tz[1:3]) * 3600 + int(tz[3:5]) * 60)
