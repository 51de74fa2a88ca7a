"""Slurm operations over one open asyncssh connection to a facility: ``SlurmClient``.

The trigger's shared poller and ``SlurmHook`` both use it. Every command is built by
``xffl_airflow.slurm.commands`` from validated, quoted values, runs after the facility's login
environment (``FacilityLogin``) and is framed (``xffl_airflow.remote_frame``): whatever the
login shell prints around it is set aside as noise (logged once per facility at debug level),
and the command's own exit status is used. An answer that cannot be read (no frame) or a
command that times out is a retryable ``SlurmCommandError`` naming the facility and the
command; an ``sbatch`` whose answer is lost is a ``SlurmSubmitUnknown``: the job may exist,
look for it by its tag before submitting again. Remote commands are counted per connection id
(``remote_command_count``), for benchmarks.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncssh

from xffl_airflow.remote_frame import FrameError, first_bytes, frame_command, new_nonce, unframe
from xffl_airflow.remote_text import split_lines
from xffl_airflow.slurm import commands, parsing
from xffl_airflow.slurm.end_records import end_record_answer
from xffl_airflow.slurm.errors import SlurmOutputError
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.states import SlurmJob, aggregate, belongs_to

log = logging.getLogger(__name__)

# asyncssh logs every channel at INFO: five lines per poll in the task and triggerer logs.
# Quieten it, unless the deployment set its level itself.
if logging.getLogger("asyncssh").level == logging.NOTSET:
    logging.getLogger("asyncssh").setLevel(logging.WARNING)

# Remote commands run, per connection id, in this process: what the polling benchmark counts.
_COMMANDS: collections.Counter[str] = collections.Counter()
DEFAULT_COMMAND_TIMEOUT = 120.0
# Facilities (connection ids) whose login shell's noise was logged already, in this process.
_NOISY: set[str] = set()


def remote_command_count(conn_id: str | None = None) -> int:
    """Remote commands run so far in this process (for ``conn_id``, or all)."""
    return _COMMANDS[conn_id] if conn_id else sum(_COMMANDS.values())


class SlurmCommandError(RuntimeError):
    """A Slurm command could not be run or answered badly. ``retryable``: asking again may help."""

    def __init__(self, conn_id: str, message: str, *, retryable: bool = True):
        super().__init__(f"facility connection {conn_id!r}: {message}")
        self.conn_id = conn_id
        self.detail = message
        self.retryable = retryable


class SlurmSubmitError(SlurmCommandError):
    """sbatch refused the job (bad partition, account, limits): asking again will not help."""


class SlurmSubmitUnknown(SlurmCommandError):
    """sbatch ran, or may have, but its answer was lost or unreadable: the job may exist.
    Look for it by its tag (``find_tagged``) before submitting again, never resubmit blindly."""


@dataclass
class RemoteResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass
class QueryResult:
    """What a facility said about some jobs in one query.

    ``jobs`` holds the jobs some source knows; ``lost`` the jobs every source answered for
    without knowing them (purged, never existed); a job in neither is unknown this time (a
    query failed): ask again, never read it as failed. ``malformed`` holds the lines of the
    answer that could not be read and were skipped (see ``parsing.Malformed``). ``vanished``
    holds the jobs squeue and scontrol no longer hold while accounting (sacct) could not be
    asked and no end record was found: how they ended cannot be learned (yet).
    """

    tz: str | None = None
    jobs: dict[str, SlurmJob] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    logs: dict[str, parsing.LogChunk] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    malformed: list[parsing.Malformed] = field(default_factory=list)
    vanished: set[str] = field(default_factory=set)

    def state_of(self, job_id: str) -> SlurmJob | None:
        return self.jobs.get(job_id)


class SlurmClient:
    """Slurm operations over one open SSH connection to one facility."""

    def __init__(
        self,
        conn_id: str,
        connection: asyncssh.SSHClientConnection,
        *,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        login: FacilityLogin | None = None,
    ):
        self.conn_id = conn_id
        self.connection = connection
        self.command_timeout = command_timeout
        self.login = login or FacilityLogin()

    async def run(
        self,
        command: str,
        *,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        what: str | None = None,
    ) -> RemoteResult:
        """Runs one remote command, framed, in the login environment; returns only what the
        command itself printed and its exit status. Connection trouble, a timeout or an
        unreadable answer raise ``SlurmCommandError`` (retryable) naming ``what`` was run."""
        _COMMANDS[self.conn_id] += 1
        what = what or (command.split() or ["command"])[0]
        limit = timeout or self.command_timeout
        data = stdin.encode() if isinstance(stdin, str) else stdin
        nonce = new_nonce()
        framed_command = frame_command(commands.build_login_command(command, self.login), nonce)
        try:
            result = await self.connection.run(
                framed_command, input=data, encoding=None, check=False, timeout=limit
            )
        except TimeoutError:  # asyncssh's TimeoutError is one too
            raise SlurmCommandError(
                self.conn_id, f"{what} timed out after {limit:g} s (command_timeout)"
            ) from None
        except (asyncssh.Error, OSError) as error:
            raise SlurmCommandError(
                self.conn_id, f"{what} failed to run: {type(error).__name__}: {error}"
            ) from None
        stdout, stderr = result.stdout or b"", result.stderr or b""
        try:
            framed = unframe(stdout, stderr, nonce)
        except FrameError as error:
            seen = "" if first_bytes(stdout) in str(error) else f"; stdout: {first_bytes(stdout)}"
            raise SlurmCommandError(
                self.conn_id,
                f"{what} gave no readable answer: {error}{seen}; stderr: {first_bytes(stderr)} "
                f"(exit status {result.returncode})",
            ) from None
        if framed.noisy and self.conn_id not in _NOISY:
            _NOISY.add(self.conn_id)
            log.debug(
                "The login shell at %s prints around our commands (set aside; logged once): %s",
                self.conn_id, first_bytes(framed.noise, limit=300),
            )  # fmt: skip
        status = framed.exit_status if framed.exit_status is not None else result.returncode
        return RemoteResult(status, framed.stdout, framed.stderr)

    async def run_script(
        self, script: str, *, timeout: float | None = None, what: str = "query script"
    ) -> parsing.Output:
        """Runs a ``commands.build_*_script`` through ``sh -s`` and reads its marked output."""
        result = await self.run("sh -s", stdin=script, timeout=timeout, what=what)
        if result.returncode not in (0, None) and not result.stdout:
            raise SlurmCommandError(
                self.conn_id,
                f"{what} failed ({result.returncode}): {result.error_text[-500:]}",
            )
        return parsing.parse_sections(result.stdout)

    # -- submitting ---------------------------------------------------------------------

    async def resolve_workdir(self, workdir: str) -> str:
        """Creates ``workdir`` if needed and returns it absolute (relative: under the login dir)."""
        result = await self.run(
            commands.build_workdir_command(workdir), what="mkdir remote_workdir"
        )
        lines = split_lines(result.text.strip())
        path = lines[-1].strip() if lines else ""
        if result.returncode != 0 or not path.startswith("/"):
            raise SlurmCommandError(
                self.conn_id,
                f"cannot create remote_workdir {workdir!r} (exit status {result.returncode}): "
                f"{result.error_text.strip()[-500:] or 'printed ' + first_bytes(result.stdout)}",
                retryable=False,
            )
        return path

    async def submit(
        self, script: str, *, workdir: str, script_name: str
    ) -> tuple[str, str | None]:
        """Writes ``script`` as ``workdir/script_name`` (aside, then renamed) and submits it.

        Returns ``(job_id, cluster)``; raises ``SlurmSubmitError`` when sbatch refuses the job
        and ``SlurmSubmitUnknown`` when its answer is lost or unreadable (the job may exist).
        """
        try:
            result = await self.run(
                commands.build_submit_command(workdir, script_name), stdin=script, what="sbatch"
            )
        except SlurmCommandError as error:
            raise SlurmSubmitUnknown(
                self.conn_id, f"{error.detail}; the job may have been submitted"
            ) from None
        if result.returncode != 0:
            raise SlurmSubmitError(
                self.conn_id,
                f"sbatch refused the job: {parsing.sbatch_error(result.error_text)}",
                retryable=False,
            )
        try:
            return parsing.parse_sbatch(result.text)
        except SlurmOutputError as error:
            raise SlurmSubmitUnknown(
                self.conn_id, f"{error}; sbatch succeeded, so the job was probably submitted"
            ) from None

    async def cancel(self, job_id: str) -> None:
        result = await self.run(commands.build_cancel_command(job_id), what="scancel")
        if result.returncode != 0:
            raise SlurmCommandError(
                self.conn_id, f"scancel {job_id} failed: {result.error_text.strip()[-500:]}"
            )

    # -- querying -----------------------------------------------------------------------

    async def poll(
        self, job_ids: Sequence[str], log_reads: Sequence[commands.LogRead] = ()
    ) -> QueryResult:
        """One command: squeue for ``job_ids`` plus the new bytes of each log in ``log_reads``.

        Jobs squeue does not hold are neither in ``jobs`` nor ``lost``: see ``resolve``.
        """
        out = await self.run_script(
            commands.build_poll_script(job_ids, log_reads), what="squeue/log poll"
        )
        answer = QueryResult(tz=out.tz, logs=out.logs, malformed=out.malformed)
        if job_ids:
            records = parsing.squeue_answer(out.section("squeue"), malformed=answer.malformed)
            if records is None:
                section = out.section("squeue")
                answer.problems.append(
                    f"squeue failed: {section.text.strip()[-300:] if section else 'no answer'}"
                )
            else:
                _file_records(answer, job_ids, records)
        return answer

    async def resolve(
        self, job_ids: Sequence[str], end_records: Mapping[str, str] | None = None
    ) -> QueryResult:
        """For jobs that left squeue: sacct, sacct -c where accounting is disabled, scontrol;
        then, for a job none of them knows, its end record (``end_records``: id -> path)."""
        out = await self.run_script(
            commands.build_resolve_script(job_ids, end_records), what="sacct/scontrol poll"
        )
        answer = QueryResult(tz=out.tz, malformed=out.malformed)
        sacct = parsing.sacct_answer(out.section("sacct"), malformed=answer.malformed)
        sacct_c = parsing.sacct_answer(
            out.section("sacct-c"), source="sacct-c", malformed=answer.malformed
        )
        accounting = sacct if sacct is not None else sacct_c
        if accounting is None:
            answer.problems.append(
                "sacct failed: "
                + " / ".join(_section_text(out.section(s)) for s in ("sacct", "sacct-c"))
            )
        for job_id in job_ids:
            scontrol = parsing.scontrol_answer(out.section("scontrol", job_id))
            from_scontrol = aggregate(job_id, [r for r in scontrol or [] if belongs_to(r, job_id)])
            from_accounting = aggregate(
                job_id, [r for r in accounting or [] if belongs_to(r, job_id)]
            )
            if from_scontrol is not None:
                answer.jobs[job_id] = from_scontrol.merged(from_accounting)
            elif from_accounting is not None:
                answer.jobs[job_id] = from_accounting
            elif scontrol is not None and (
                ended := end_record_answer(out.section("end", job_id), job_id=job_id, tz=out.tz)
            ):  # fmt: skip
                answer.jobs[job_id] = ended
            elif scontrol is not None and accounting is not None:
                answer.lost.add(job_id)
            elif scontrol is not None:
                answer.vanished.add(job_id)
        return answer

    async def query(
        self, job_ids: Sequence[str], end_records: Mapping[str, str] | None = None
    ) -> QueryResult:
        """squeue, then the fallbacks for the jobs squeue does not hold: the whole answer."""
        answer = await self.poll(job_ids)
        missing = [j for j in job_ids if j not in answer.jobs and not answer.problems]
        if missing:
            resolved = await self.resolve(missing, end_records)
            answer.jobs.update(resolved.jobs)
            answer.lost |= resolved.lost
            answer.vanished |= resolved.vanished
            answer.problems += resolved.problems
            answer.malformed += resolved.malformed
            answer.tz = answer.tz or resolved.tz
        return answer

    async def find_tagged(
        self, job_name: str, comment: str | None
    ) -> tuple[str | None, list[SlurmJob]]:
        """The user's jobs named ``job_name`` (and with ``comment``, if given), oldest first:
        squeue (every state it remembers), then sacct over the last days."""
        out = await self.run_script(
            commands.build_find_script(job_name), what="squeue/sacct lookup by name"
        )
        queued = parsing.squeue_answer(out.section("squeue"))
        if queued is None:
            raise SlurmCommandError(
                self.conn_id,
                "squeue failed while looking for jobs named "
                f"{job_name!r}: {_section_text(out.section('squeue'))}",
            )
        found: dict[str, SlurmJob] = {}
        for record in (
            parsing.sacct_answer(out.section("sacct")) or []
        ) + queued:  # squeue last: it wins
            if (
                (comment is None or record.comment == comment)
                and "_" not in record.job_id
                and "+" not in record.job_id
            ):
                found[record.job_id] = record
        return out.tz, sorted(found.values(), key=lambda r: int(r.raw_id or r.job_id))

    async def log_tails(self, reads: Sequence[tuple[str, str]], lines: int) -> dict[str, list[str]]:
        """The last ``lines`` lines of each ``(job_id, log_path)``; a missing file gives []."""
        if not reads:
            return {}
        out = await self.run_script(commands.build_tail_script(reads, lines), what="log tail")
        return {
            job_id: parsing.tail_lines(out.tails.get(job_id, b""), lines) for job_id, _ in reads
        }


def _section_text(section: parsing.Section | None) -> str:
    return section.text.strip()[-300:] if section is not None else "no answer"


def _file_records(answer: QueryResult, job_ids: Iterable[str], records: list[SlurmJob]) -> None:
    for job_id in job_ids:
        mine = [r for r in records if belongs_to(r, job_id)]
        job = aggregate(job_id, mine)
        if job is not None:
            answer.jobs[job_id] = job


