"""Progress lines for the task log, and an optional cap on the rate (both pure, clock injected)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def format_progress(label: str, done: int, total: int, elapsed: float) -> str:
    """One progress line: bytes, percent, MB/s and ETA."""
    percent = 100.0 * done / total if total else 100.0
    rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
    if done >= total:
        eta = "done"
    elif rate > 0:
        eta = f"ETA {_duration((total - done) / (rate * 1e6))}"
    else:
        eta = "ETA unknown"
    return f"{label}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({percent:.0f}%), {rate:.1f} MB/s, {eta}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLog:
    """Logs the bytes moved so far every ``interval`` seconds and at each 10 % step.

    :param label: what moves, e.g. ``"push to site1:/work/model"``
    :param total: bytes to move in this call
    :param interval: seconds between lines at most
    :param clock: a monotonic clock (injected in tests)
    :param emit: where lines go (``log.info`` by default)
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ):
        self.label = label
        self.total = total
        self.done = 0
        self._interval = interval
        self._clock = clock
        self._emit = emit or (lambda line: log.info("%s", line))
        self._start = clock()
        self._last_time = self._start
        self._last_step = 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = self._clock()
        step = int(10 * self.done / self.total) if self.total else 10
        if now - self._last_time >= self._interval or step > self._last_step:
            self._last_time = now
            self._last_step = step
            self._emit(format_progress(self.label, self.done, self.total, now - self._start))


class RateLimiter:
    """Paces data to at most ``mbps`` MB/s: ``delay(n)`` says how long to wait before sending n bytes.

    Time is virtual: each send books ``n / rate`` seconds after the previous booking, so bursts
    are smoothed without a background task. ``mbps=None`` never waits.
    """

    def __init__(self, mbps: float | None, *, clock: Callable[[], float] = time.monotonic):
        self._rate = mbps * 1e6 if mbps else None
        self._clock = clock
        self._booked = clock()

    def delay(self, nbytes: int) -> float:
        if self._rate is None:
            return 0.0
        now = self._clock()
        self._booked = max(self._booked, now) + nbytes / self._rate
        return max(0.0, self._booked - now - nbytes / self._rate)
