"""Shared polling of a facility's Slurm jobs inside one event loop (a triggerer).

Every ``SlurmJobTrigger`` of the same facility (SSH connection id) in one triggerer registers a
*watch* with that facility's ``FacilityPoller``. The poller keeps one SSH connection and runs
one remote command per poll for all its watches: ``squeue`` for every watched job plus the new
bytes of every running job's log. Only jobs that left squeue cost a second command (sacct,
``sacct -c``, scontrol, the job's end record), and only on the polls where that happens. So the number of remote
commands per minute follows the number of facilities, not of jobs.

Each watch polls fast at first (``MIN_INTERVAL``) and backs off towards its own
``poll_interval``; a poll serves every watch, and polls are at least ``MIN_INTERVAL`` apart.
A failed connection or query is retried on jittered, bounded exponential backoff and reported
to the watches as a ``problem``, never as a job state. A connection that cannot work (no such
Airflow connection, host-key mismatch, login refused) is reported as ``fatal`` after
``FATAL_AFTER`` tries in a row. A line of an answer that cannot be read (a bad ``@@xffl``
marker, a short squeue row) is skipped and logged, once per kind and poller: the other jobs'
updates flow on, and the job it concerned is asked again at the next poll.

Pollers are keyed by connection id and login environment (``FacilityLogin``):
two environments on one connection id never share a poller, whose commands run in its own.

The poller runs in a task with an empty context, so its own log lines do not land in one
trigger's task log; each trigger logs what its watch receives.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncssh

from xffl_airflow.hooks.slurm import QueryResult, SlurmClient, SlurmCommandError
from xffl_airflow.slurm.commands import DEFAULT_LOG_CHUNK, LogRead
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.parsing import Malformed
from xffl_airflow.slurm.script import end_record_path
from xffl_airflow.slurm.states import Phase, SlurmJob
from xffl_airflow.ssh import FacilityConnectionError, aget_target, connect

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # first poll interval of a new watch, and the least time between two polls
GROWTH = 1.5  # each poll multiplies a watch's interval by this, up to its poll_interval
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
FATAL_AFTER = 3
LINGER = 15.0  # an idle poller keeps its connection this long for the next watch
MAX_LINE = 4000  # longer log lines are cut
MAX_DRAIN_POLLS = 40  # after the job ended, read at most this many more log chunks (10 MiB)

Connector = Callable[[str], Awaitable[SlurmClient]]


@dataclass
class JobUpdate:
    """What one poll says to one watch."""

    job: SlurmJob | None = None  # the latest record; None when not known this time
    lost: bool = False  # every source answered and none knows the job (or it vanished)
    vanished: bool = False  # left squeue and scontrol; no accounting to ask, no end record
    accounting: str | None = None  # why sacct could not tell how the job ended, this poll
    tz: str | None = None
    log_lines: list[str] = field(default_factory=list)
    log_offset: int = 0
    final: bool = False  # the job ended and its log was read to the end: the last update
    log_tail: list[str] = field(default_factory=list)  # with the final update
    problem: str | None = None  # the facility could not be asked this time
    fatal: str | None = None  # the facility cannot be asked at all: the last update


class Watch:
    """One trigger's interest in one job; its updates arrive on ``updates``."""

    _serial = itertools.count(1)

    def __init__(self, job_id: str, *, log_path: str | None, log_offset: int, poll_interval: float,
                 follow_log: bool, tail_lines: int):  # fmt: skip
        self.key = f"w{next(self._serial)}"
        self.job_id = job_id
        self.log_path = log_path
        self.offset = max(int(log_offset), 0)
        self.follow_log = bool(follow_log and log_path)
        self.tail_lines = tail_lines
        self.max_interval = max(float(poll_interval), MIN_INTERVAL)
        self.interval = MIN_INTERVAL
        self.next_due = 0.0
        self.updates: asyncio.Queue[JobUpdate] = asyncio.Queue()
        self.phase: Phase | None = None
        self.final_job: SlurmJob | None = None
        self.drained = False  # the log was read to its end after the job ended
        self.drain_polls = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=max(tail_lines, 1))
        self._partial = b""
        self.done = False

    def log_read(self) -> LogRead | None:
        if not self.follow_log or self.phase is Phase.WAITING:
            return None
        return LogRead(self.key, self.log_path, self.offset, DEFAULT_LOG_CHUNK)

    def take(self, answer: QueryResult, now: float, *, polled_state: bool) -> JobUpdate:
        """Files one poll's answer; returns the update for the trigger."""
        update = JobUpdate(tz=answer.tz)
        chunk = answer.logs.get(self.key)
        if chunk is not None:
            if chunk.offset < self.offset:  # the file shrank (rewritten): start over
                self._partial = b""
            update.log_lines = self._lines(chunk.data)
            self.offset = chunk.next_offset
        if polled_state:
            job = answer.jobs.get(self.job_id)
            update.job = job
            update.lost = self.job_id in answer.lost or self.job_id in answer.vanished
            update.vanished = self.job_id in answer.vanished
            if job is not None:
                self.phase = job.phase
                if job.phase.final:
                    self.final_job = job
                    # the log read ran after squeue in the same script: it is complete if at EOF
                    self.drained = not self.follow_log or (chunk is not None and _at_eof(chunk))
        else:
            update.job = self.final_job
            self.drain_polls += 1
            # no chunk: the read's answer was cut off or unreadable; ask again (bounded)
            self.drained = (
                self.drained
                or (chunk is not None and _at_eof(chunk))
                or self.drain_polls >= MAX_DRAIN_POLLS
            )
        update.log_offset = self.offset
        if self.final_job is not None and self.drained:
            update.final = True
            update.job = self.final_job
            if self._partial:
                update.log_lines.append(self._line(self._partial))
                self._partial = b""
            update.log_tail = list(self.tail)[-self.tail_lines :] if self.tail_lines > 0 else []
        if self.final_job is not None and not self.drained:
            self.next_due = now + MIN_INTERVAL  # drain the rest of the log quickly
        else:
            self.next_due = now + self.interval
            self.interval = min(self.interval * GROWTH, self.max_interval)
        return update

    def _lines(self, data: bytes) -> list[str]:
        if not data:
            return []
        pieces = (self._partial + data).split(b"\n")
        self._partial = pieces.pop()
        if len(self._partial) > MAX_LINE * 4:  # a line without end: show it in parts
            pieces.append(self._partial)
            self._partial = b""
        lines = [self._line(p) for p in pieces]
        return lines

    def _line(self, raw: bytes) -> str:
        line = raw.decode(errors="replace").rstrip("\r")
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + " [...]"
        if line.strip():
            self.tail.append(line)
        return line


def _at_eof(chunk) -> bool:
    return chunk.size < 0 or chunk.next_offset >= chunk.size


async def _default_connector(conn_id: str) -> SlurmClient:
    target = await aget_target(conn_id)
    return SlurmClient(conn_id, await connect(target))


class FacilityPoller:
    """Polls one facility for every watch registered in this event loop. Use ``poller_for``."""

    def __init__(self, conn_id: str, *, connector: Connector | None = None,
                 login: FacilityLogin | None = None):  # fmt: skip
        self.conn_id = conn_id
        self.login = login or FacilityLogin()
        self.key = self.login.key(conn_id)
        self.watches: dict[str, Watch] = {}
        self.closed = False
        self.polls = 0
        self._connector = connector or _default_connector
        self._client: SlurmClient | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_poll = -MIN_INTERVAL
        self._retry_at = 0.0
        self._failures = 0
        self._fatal_failures = 0
        self.malformed_lines = 0  # lines of the facility's answers skipped as unreadable
        self._malformed_kinds: set[str] = set()

    @asynccontextmanager
    async def watch(self, job_id: str, *, log_path: str | None = None, log_offset: int = 0,
                    poll_interval: float = 30.0, follow_log: bool = True, tail_lines: int = 50
                    ) -> AsyncIterator[Watch]:  # fmt: skip
        """Registers a watch for ``job_id`` for the duration of the ``async with`` block."""
        if self.closed:
            raise RuntimeError("this poller is closed; get another from poller_for()")
        watch = Watch(job_id, log_path=log_path, log_offset=log_offset, poll_interval=poll_interval,
                      follow_log=follow_log, tail_lines=tail_lines)  # fmt: skip
        self.watches[watch.key] = watch
        self._wake.set()
        if self._task is None:
            # An empty context: the poller's log lines must not land in this trigger's task log.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"slurm-poller-{self.conn_id}", context=contextvars.Context()
            )
        try:
            yield watch
        finally:
            self.watches.pop(watch.key, None)
            self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                active = [w for w in self.watches.values() if not w.done]
                if not active:
                    if not await self._wait(LINGER) and not self.watches:
                        break
                    continue
                due = min(w.next_due for w in active)
                delay = max(due - now, self._last_poll + MIN_INTERVAL - now, self._retry_at - now)
                if delay > 0:
                    await self._wait(delay)
                    continue
                await self._poll_once()
        except Exception as error:  # never leave a watch waiting forever
            log.exception("Slurm poller of %s stopped", self.conn_id)
            self._broadcast(
                JobUpdate(
                    fatal=f"the poller of {self.conn_id} stopped: {type(error).__name__}: {error}"
                )
            )
        finally:
            self.closed = True
            _forget(self)
            await self._drop_client()

    async def _wait(self, seconds: float) -> bool:
        """Sleeps up to ``seconds``; True when woken by a watch coming or going."""
        self._wake.clear()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(seconds):
                await self._wake.wait()
            return True
        except TimeoutError:
            return False

    async def _poll_once(self) -> None:
        watches = [w for w in self.watches.values() if not w.done]
        self._last_poll = time.monotonic()
        try:
            client = await self._get_client()
        except FacilityConnectionError as error:
            self._failed(str(error), fatal=not error.retryable)
            return
        state_ids = sorted({w.job_id for w in watches if w.final_job is None})
        reads = [r for r in (w.log_read() for w in watches) if r is not None]
        try:
            answer = await client.poll(state_ids, reads)
            self._skipped(answer.malformed)
            if answer.problems:
                self._failed("; ".join(answer.problems))
                return
            missing = [j for j in state_ids if j not in answer.jobs]
            accounting = None
            if missing:
                records = {w.job_id: end_record_path(w.log_path) for w in watches}
                resolved = await client.resolve(
                    missing, {j: p for j, p in records.items() if j in missing and p}
                )
                self._skipped(resolved.malformed)
                answer.jobs.update(resolved.jobs)
                answer.lost |= resolved.lost
                answer.vanished |= resolved.vanished
                answer.tz = answer.tz or resolved.tz
                if resolved.problems:
                    accounting = "; ".join(resolved.problems)
                    log.warning("Slurm at %s: %s", self.conn_id, accounting)
            tails = await self._tails_without_log(client, watches, answer)
        except SlurmCommandError as error:
            await self._drop_client()
            self._failed(str(error))
            return
        self._failures = self._fatal_failures = 0
        self.polls += 1
        now = time.monotonic()
        for watch in watches:
            update = watch.take(answer, now, polled_state=watch.job_id in state_ids)
            if accounting and watch.job_id in missing:
                update.accounting = accounting
            if update.final:
                if watch.key in tails:
                    update.log_tail = tails[watch.key]
                watch.done = True
            watch.updates.put_nowait(update)

    async def _tails_without_log(
        self, client: SlurmClient, watches: list[Watch], answer: QueryResult
    ) -> dict[str, list[str]]:
        """Log tails of jobs that end now and whose log is not followed (one more command)."""
        wanted = []
        for w in watches:
            job = answer.jobs.get(w.job_id)
            if (
                not w.follow_log
                and w.log_path
                and w.tail_lines > 0
                and job is not None
                and job.phase.final
            ):
                wanted.append(w)
        if not wanted:
            return {}
        by_job = await client.log_tails(
            [(w.job_id, w.log_path) for w in wanted], max(w.tail_lines for w in wanted)
        )
        return {w.key: by_job.get(w.job_id, [])[-w.tail_lines :] for w in wanted}

    async def _get_client(self) -> SlurmClient:
        if self._client is None:
            self._client = await self._connector(self.conn_id)
            self._client.login = self.login  # every command of this poller runs in it
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.connection.close()
            try:
                async with asyncio.timeout(5):
                    await client.connection.wait_closed()
            except (
                TimeoutError,
                OSError,
                asyncssh.Error,
            ) as error:  # a dead link: nothing to close
                log.debug("Closing the link to %s: %s", self.conn_id, error)

    def _skipped(self, lines: list[Malformed]) -> None:
        """Logs the unreadable lines of an answer: the first of each kind as a warning, the
        rest at debug level (a facility that keeps printing one would flood the log)."""
        for item in lines:
            self.malformed_lines += 1
            if item.kind in self._malformed_kinds:
                log.debug("Slurm at %s: skipped another unreadable %s line: %r",
                          self.conn_id, item.kind, item.line)  # fmt: skip
                continue
            self._malformed_kinds.add(item.kind)
            log.warning("Slurm at %s printed an unreadable %s line, skipped (further ones are "
                        "logged at debug level): %r", self.conn_id, item.kind, item.line)  # fmt: skip

    def _failed(self, message: str, *, fatal: bool = False) -> None:
        self._failures += 1
        self._fatal_failures = self._fatal_failures + 1 if fatal else 0
        if self._fatal_failures >= FATAL_AFTER:
            self._broadcast(JobUpdate(fatal=message))
            self._fatal_failures = 0
            return
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self._failures - 1)) * random.uniform(
            0.5, 1.0
        )
        self._retry_at = time.monotonic() + delay
        log.warning("Slurm at %s could not be asked (try %s, again in %.1f s): %s",
                    self.conn_id, self._failures, delay, message)  # fmt: skip
        self._broadcast(
            JobUpdate(problem=f"{message} (try {self._failures}, again in {delay:.0f} s)")
        )

    def _broadcast(self, update: JobUpdate) -> None:
        for watch in list(self.watches.values()):
            if not watch.done:
                if update.fatal:
                    watch.done = True
                watch.updates.put_nowait(
                    JobUpdate(**{**update.__dict__, "log_offset": watch.offset})
                )


# One poller per facility and event loop: the triggerer runs all its triggers in one loop.
_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, FacilityPoller]] = (
    weakref.WeakKeyDictionary()
)


def poller_for(conn_id: str, *, connector: Connector | None = None,
               login: FacilityLogin | None = None) -> FacilityPoller:  # fmt: skip
    """The running loop's poller of ``conn_id`` in ``login`` environment (made on first use)."""
    loop = asyncio.get_running_loop()
    pollers = _POLLERS.setdefault(loop, {})
    key = (login or FacilityLogin()).key(conn_id)
    poller = pollers.get(key)
    if poller is None or poller.closed:
        poller = pollers[key] = FacilityPoller(conn_id, connector=connector, login=login)
    return poller


def _forget(poller: FacilityPoller) -> None:
    for pollers in _POLLERS.values():
        if pollers.get(poller.key) is poller:
            del pollers[poller.key]
