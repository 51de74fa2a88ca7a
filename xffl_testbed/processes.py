"""Process bookkeeping: find what a set of PIDs started, and end all of it by PID."""

from __future__ import annotations

import os
import signal
import time


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def owner(pid: int) -> int | None:
    """The user ID a process runs as, or None once it has gone (short-lived helpers come and go)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def with_descendants(pids: list[int] | set[int]) -> set[int]:
    """``pids`` and every live process below them in the process tree."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [p for p in pids if alive(p)]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def terminate(pids: list[int] | set[int], *, grace: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Sends ``sig`` to ``pids`` and their descendants; SIGKILLs whatever is left after ``grace``."""
    targets = with_descendants(pids)
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(alive(p) for p in targets):
            return
        time.sleep(0.2)
    for pid in with_descendants(targets) | targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
