"""Helpers for the Slurm tests that run against the real local facilities.

They run the real operator, trigger and sensor in this process the way Airflow does:
``execute()`` until it defers, the trigger's ``run()`` in an event loop (as the triggerer does),
then ``execute_complete()`` with the event. The Airflow connections come from
``AIRFLOW_CONN_<ID>`` variables, as in a deployment.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from airflow.sdk.exceptions import TaskDeferred


class MemoryStateStore:
    """A dict with the get/set/delete of Airflow's ``task_state_store`` accessor.

    Only where no task runner exists (operators called in-process); the live DAG test uses
    Airflow's own store."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(json.dumps(self.data[key])) if key in self.data else default

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.data[key] = json.loads(json.dumps(value))  # JSON-safe, as the real store demands

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def task_context(task_id: str, *, dag_id: str = "slurm_tests", run_id: str = "manual__test", map_index: int = -1,
                 store: MemoryStateStore | None = None) -> dict[str, Any]:  # fmt: skip
    context: dict[str, Any] = {
        "ti": SimpleNamespace(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)
    }
    if store is not None:
        context["task_state_store"] = store
    return context


def use_connections(monkeypatch: pytest.MonkeyPatch, testbed) -> None:
    for name, value in testbed.airflow_env().items():
        monkeypatch.setenv(name, value)


def facility_of_tests(testbed, monkeypatch: pytest.MonkeyPatch, name: str, owns: Callable[[str], bool]):
    """Yields the facility ``name`` with the connections set; afterwards cancels the jobs still
    queued or running whose comment ``owns`` claims (a fixture body: ``yield from`` it)."""
    use_connections(monkeypatch, testbed)
    facility = testbed.facility(name)
    yield facility
    out = facility.ssh("squeue -h --me -o '%i|%k'", check=False).stdout
    mine = [job for job, _, comment in (line.partition("|") for line in out.splitlines()) if owns(comment)]
    if mine:
        facility.ssh("scancel " + " ".join(mine), check=False)


async def first_event(trigger, *, timeout: float = 300) -> dict[str, Any]:
    """Runs the trigger as the triggerer does and returns its first event's payload."""
    async with asyncio.timeout(timeout):
        async for event in trigger.run():
            return event.payload
    raise AssertionError("the trigger ended without an event")


def defer(operator, context: dict[str, Any]):
    """Calls ``execute``; returns the trigger it deferred to (fails if it did not defer)."""
    try:
        result = operator.execute(context)
    except TaskDeferred as deferred:
        return deferred.trigger, deferred.timeout
    raise AssertionError(f"{operator.task_id} did not defer; it returned {result!r}")


def run_task(operator, context: dict[str, Any], *, timeout: float = 300) -> Any:
    """execute -> (defer -> trigger -> execute_complete), as Airflow runs a deferrable task."""
    try:
        return operator.execute(context)
    except TaskDeferred as deferred:
        event = asyncio.run(first_event(deferred.trigger, timeout=timeout))
        return getattr(operator, deferred.method_name)(context, event)


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 60,
    every: float = 0.5,
    what: str = "condition",
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s")


def job_state(facility, job_id: str) -> str | None:
    """The job's state as the facility user sees it (scontrol), or None once purged."""
    result = facility.ssh(f"scontrol show -o job {job_id}", check=False)
    if "JobState=" not in result.stdout:
        return None
    return result.stdout.split("JobState=")[1].split()[0]


def tagged_jobs(facility, comment: str) -> list[str]:
    """Ids of the facility user's jobs that squeue remembers with this comment."""
    out = facility.ssh("squeue -h -t all --me -o '%i|%k'").stdout
    return [line.split("|")[0] for line in out.splitlines() if line.split("|", 1)[-1] == comment]


class CapturedLogs:
    """Log lines of triggers and operators (structlog), rendered with their arguments."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries

    @property
    def lines(self) -> list[str]:
        out = []
        for entry in self.entries:
            text = str(entry.get("event", ""))
            args = entry.get("positional_args")
            if args:
                try:
                    text = text % tuple(args)
                except (TypeError, ValueError):
                    pass
            out.append(text)
        return out

    def containing(self, fragment: str) -> list[str]:
        return [line for line in self.lines if fragment in line]


class capture_logs:  # named like structlog.testing.capture_logs
    def __enter__(self) -> CapturedLogs:
        self._context = structlog.testing.capture_logs()
        return CapturedLogs(self._context.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)
