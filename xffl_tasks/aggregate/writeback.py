"""Starting the disk write-back of what was just written, on a thread of its own.

A fresh output sits in the page cache until the final fsync, which then waits for all of it
(1.5 s per GB on this machine's disk). Asking Linux to start writing each range back as soon
as it is written (``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``) overlaps the disk
writes with the aggregation; the call may block while the device queue is full, hence its own
thread. Where the call does not exist (not Linux), nothing is started and fsync does it all.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable

_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start write-out of dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()


class WriteBack:
    """A thread that starts the write-back of the byte ranges it is handed.

    Callers must ``drain()`` before closing a file descriptor they handed over, so that no
    request outlives its descriptor (whose number may be reused).
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="aggregate-writeback", daemon=True)
        if _SYNC_FILE_RANGE is not None:
            self._thread.start()

    def request(self, fd: int, offset: int, length: int) -> None:
        if _SYNC_FILE_RANGE is not None:
            self._requests.put((fd, offset, length))

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            try:
                _SYNC_FILE_RANGE(*request, _WRITE)  # failures only cost the early start
            finally:
                self._requests.task_done()
        self._requests.task_done()

    def drain(self) -> None:
        """Waits until every request handed so far has been issued."""
        if _SYNC_FILE_RANGE is not None:
            self._requests.join()

    def close(self) -> None:
        if _SYNC_FILE_RANGE is not None and self._thread.is_alive():
            self._requests.put(None)
            self._thread.join()
