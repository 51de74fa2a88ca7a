"""Reading what Slurm printed. Pure functions, tested on literal command output.

An answer is a list of ``SlurmJob`` records, or None when the query failed (controller down,
command missing, garbage): None means "ask again", never "the job failed".
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from xffl_airflow.slurm.commands import FIELD_SEP, MARK, SACCT_FIELDS, SQUEUE_FIELDS
from xffl_airflow.slurm.errors import SlurmOutputError
from xffl_airflow.slurm.states import SlurmJob, exit_code_from_wait_status, normalize_state

# What squeue/scontrol print for a job id they do not hold (purged after MinJobAge): a real answer.
INVALID_JOB_ID = "Invalid job id specified"
_NULLS = {"", "(null)", "N/A", "NONE", "None", "Unknown", "n/a"}
_SBATCH_ID = re.compile(r"^([0-9]+)(?:;(\S+))?$")
_TZ = re.compile(r"^[+-][0-9]{4}$")


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

    def section(self, name: str, arg: str | None = None) -> Section | None:
        for section in self.sections:
            if section.name == name and section.arg == arg:
                return section
        return None


def parse_sections(data: bytes | str) -> Output:
    """Splits the output of a script from ``commands`` into its marked parts."""
    if isinstance(data, str):
        data = data.encode()
    out = Output()
    lines = data.split(b"\n")
    i = 0
    current: Section | None = None
    body: list[str] = []
    while i < len(lines):
        raw = lines[i]
        line = raw.decode(errors="replace")
        i += 1
        if not line.startswith(MARK + " "):
            if current is not None:
                body.append(line)
            continue
        words = line.split()
        kind = words[1] if len(words) > 1 else ""
        if kind == "tz" and len(words) == 3 and _TZ.match(words[2]):
            out.tz = words[2]
        elif kind == "begin" and len(words) >= 3:
            current = Section(words[2], words[3] if len(words) > 3 else None, "", None)
            body = []
        elif kind == "end" and current is not None:
            current.text = "\n".join(body).strip("\n")
            current.rc = (
                int(words[2]) if len(words) > 2 and words[2].lstrip("-").isdigit() else None
            )
            out.sections.append(current)
            current = None
        elif kind == "log" and len(words) == 6:
            key, size, offset, count = words[2], int(words[3]), int(words[4]), int(words[5])
            encoded = lines[i] if i < len(lines) else b""
            i += 1
            try:
                chunk = base64.b64decode(encoded, validate=True) if encoded else b""
            except ValueError:
                chunk = b""
            out.logs[key] = LogChunk(key, size, offset, chunk[:count] if count >= 0 else b"")
    if current is not None:  # cut off mid-section: keep what came, without an exit status
        current.text = "\n".join(body).strip("\n")
        out.sections.append(current)
    return out


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text in _NULLS else text


def parse_squeue(text: str) -> list[SlurmJob]:
    """Rows of ``squeue -O`` with ``commands.SQUEUE_FIELDS``, each field ended by FIELD_SEP."""
    jobs = []
    for line in text.splitlines():
        if FIELD_SEP not in line:
            continue
        cells = line.split(FIELD_SEP)
        if len(cells) < len(SQUEUE_FIELDS):
            raise SlurmOutputError(
                f"squeue printed {len(cells)} fields, expected {len(SQUEUE_FIELDS)}: {line!r}"
            )
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


def parse_sacct(text: str, *, source: str = "sacct") -> list[SlurmJob]:
    """Rows of ``sacct -n -P --delimiter=FIELD_SEP -o SACCT_FIELDS`` (``sacct -c`` too).

    A job listed twice (requeued) keeps its last row.
    """
    by_id: dict[str, SlurmJob] = {}
    for line in text.splitlines():
        if FIELD_SEP not in line:
            continue
        cells = line.split(FIELD_SEP)
        if len(cells) < len(SACCT_FIELDS):
            raise SlurmOutputError(
                f"sacct printed {len(cells)} fields, expected {len(SACCT_FIELDS)}: {line!r}"
            )
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
    for line in text.splitlines():
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
    for line in reversed(stdout.strip().splitlines()):
        match = _SBATCH_ID.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    raise SlurmOutputError(f"sbatch --parsable printed no job id: {stdout.strip()[-500:]!r}")


def sbatch_error(stderr: str) -> str:
    """The reasons in sbatch's error output, joined: "invalid partition specified: nope;
    Batch job submission failed: Invalid partition name specified"."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    if errors:
        return "; ".join(errors)
    return lines[-1] if lines else "no error message"


def squeue_answer(section: Section | None) -> list[SlurmJob] | None:
    """squeue's records, [] when it holds none of the jobs, None when the query failed."""
    if section is None or section.rc is None:
        return None
    if section.rc != 0:
        return [] if INVALID_JOB_ID in section.text else None
    try:
        return parse_squeue(section.text)
    except SlurmOutputError:
        return None


def sacct_answer(section: Section | None, *, source: str = "sacct") -> list[SlurmJob] | None:
    if section is None or section.rc is None or section.rc != 0:
        return None
    try:
        return parse_sacct(section.text, source=source)
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
