"""What push and pull share: attempts with reconnects, the verified-prefix resume, progress.

A transfer is a series of attempts, each over one fresh SSH connection. When the link goes
away (sshd killed, network down) the attempt ends with ``RetryableFailure``; the next attempt
reconnects after a jittered backoff and carries on: finished files stay finished, and a file
cut off midway resumes after the prefix that both sides hash alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from xffl_airflow.ssh import SSHTarget
from xffl_airflow.transfer.commands import matching_segments
from xffl_airflow.transfer.errors import RetryableFailure, TransferError
from xffl_airflow.transfer.facility import RemoteFacility
from xffl_airflow.transfer.local import segment_states
from xffl_airflow.transfer.options import TransferOptions
from xffl_airflow.transfer.progress import ProgressLog, RateLimiter
from xffl_airflow.transfer.report import TransferReport
from xffl_airflow.transfer.session import FacilitySession
from xffl_airflow.transfer.streams import Flow

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF = 30.0


def backoff_delay(failures: int, base: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``failures``-th failure: doubling from ``base``, capped, jittered
    to between half and all of it so that facilities retried together spread out."""
    ceiling = min(MAX_BACKOFF, base * 2 ** (failures - 1))
    return ceiling * (0.5 + 0.5 * rng())


async def run_all(jobs: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Runs ``jobs`` at most ``limit`` at a time; on the first failure cancels the rest and
    raises it (a ``TransferError`` that no retry can fix wins over a lost link)."""
    if not jobs:
        return []
    semaphore = asyncio.Semaphore(limit)

    async def guarded(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    tasks = [asyncio.ensure_future(guarded(job)) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in tasks if t in done and not t.cancelled() and t.exception()]
        if errors:
            final = [e for e in errors if isinstance(e, TransferError) and not e.retryable]
            raise (final or errors)[0]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TransferRun:
    """One ``push`` or ``pull`` call; subclasses say what an attempt does.

    :param facility: where the remote folder is
    :param target: how to reach it (from the facility's Airflow connection)
    :param options: tuning
    :param local_dir: the local folder
    :param remote_dir: the remote folder, absolute, checked lexically to be in the workdir
    """

    direction = ""

    def __init__(
        self,
        *,
        facility: RemoteFacility,
        target: SSHTarget,
        options: TransferOptions,
        local_dir: Path,
        remote_dir: str,
    ):
        self.facility = facility
        self.target = target
        self.options = options
        self.local_dir = local_dir
        self.remote_dir = remote_dir
        self.report = TransferReport(
            facility=facility.name,
            direction=self.direction,
            local_dir=str(local_dir),
            remote_dir=remote_dir,
        )
        self.limiter = RateLimiter(options.max_mbps)
        self.progress: ProgressLog | None = None
        self._window: asyncio.Semaphore | None = None
        self._positions: dict[str, int] = {}  # per file: bytes at the destination so far

    @property
    def label(self) -> str:
        where = f"{self.facility.name}:{self.remote_dir}"
        return (
            f"push {self.local_dir} -> {where}"
            if self.direction == "push"
            else f"pull {where} -> {self.local_dir}"
        )

    async def attempt(self, session: FacilitySession) -> None:
        raise NotImplementedError

    async def run(self) -> TransferReport:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                session = await FacilitySession.open(self.facility, self.target, self.options)
            except RetryableFailure as failure:
                failures = await self._after_failure(failures, failure)
                continue
            self._window = asyncio.Semaphore(self.options.max_requests)
            sent_before = self.report.bytes_sent
            lost: RetryableFailure | None = None
            try:
                await self.attempt(session)
            except RetryableFailure as failure:
                lost = failure
            finally:
                self.report.sent_per_attempt.append(self.report.bytes_sent - sent_before)
                await session.close()
            if lost is None:
                break
            failures = await self._after_failure(failures, lost)
        report = self.report
        report.files = dict(sorted(report.files.items()))
        report.seconds = round(time.monotonic() - started, 3)
        report.mbps = (
            round(report.bytes_sent / report.seconds / 1e6, 2) if report.seconds > 0 else 0.0
        )
        log.info(
            "%s: %d files (%d skipped, unchanged), %.1f MiB sent in %.1f s (%.1f MB/s), %d retries",
            self.label, len(report.files), report.files_skipped, report.bytes_sent / 2**20,
            report.seconds, report.mbps, report.retries,
        )  # fmt: skip
        return report

    async def _after_failure(self, failures: int, failure: RetryableFailure) -> int:
        failures += 1
        if failures > self.options.retries:
            raise TransferError(
                self.facility.name,
                f"{self.label} gave up after {failures} failed attempts; last: {failure.message}",
                path=self.remote_dir,
                retryable=True,
            )
        self.report.retries += 1
        delay = backoff_delay(failures, self.options.backoff)
        log.warning(
            "%s: %s; reconnecting in %.1f s (retry %d of %d)",
            self.label, failure.message, delay, failures, self.options.retries,
        )  # fmt: skip
        await asyncio.sleep(delay)
        return failures

    # shared by push and pull

    def start_progress(self, total: int) -> None:
        if self.progress is None:
            self.progress = ProgressLog(self.label, total, interval=self.options.progress_interval)

    def restart_at(self, relative: str, offset: int) -> None:
        """A file's data is (again) at the destination up to ``offset``: a resumed prefix, or 0
        when it starts over. Keeps the progress count true across resumes and resends."""
        self.moved(relative, offset - self._positions.get(relative, 0))

    def moved(self, relative: str, nbytes: int) -> None:
        self._positions[relative] = self._positions.get(relative, 0) + nbytes
        if self.progress is not None:
            self.progress.advance(nbytes)

    def flow(self, relative: str) -> Flow:
        """The shared window and rate cap, counting the bytes of file ``relative``."""
        assert self._window is not None

        def sent(nbytes: int) -> None:
            self.report.bytes_sent += nbytes
            self.moved(relative, nbytes)

        return Flow(
            self._window, self.options.max_requests, self.limiter, self.options.chunk_size, sent
        )

    async def verified_prefix(
        self, session: FacilitySession, local_path: Path, remote_path: str, length: int
    ) -> tuple[int, object]:
        """How far the interrupted copy may be kept: the segments of the first ``length`` bytes
        that hash alike on both sides. Returns that offset and the sha256 state after it."""
        segment = self.options.segment_size
        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(
            None, segment_states, local_path, length, segment, self.options.chunk_size
        )
        try:
            remote = await session.segment_hashes(remote_path, length)
        finally:
            digests, states = await local
        kept = matching_segments(digests, remote)
        offset = min(kept * segment, length)
        self.report.bytes_resumed += offset
        log.info(
            "%s: %s: %d of %d bytes of the unfinished copy hash alike on both sides; resuming there",
            self.label, remote_path, offset, length,
        )  # fmt: skip
        return offset, states[kept]

    @staticmethod
    def fresh_digest():
        return hashlib.sha256()
