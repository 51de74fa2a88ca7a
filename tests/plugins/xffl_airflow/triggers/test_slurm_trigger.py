"""SlurmJobTrigger against real Slurm behind real sshd: exactly one event, rebuilt from
serialize() mid-job, sshd stopped and restarted mid-job, shared polling per facility, an
unknown job never read as failed, on_kill cancels.

Starts: nothing of its own but Slurm jobs; uses the session's ``testbed`` (``site1``:
slurmctld, slurmd, sshd; the sshd test stops and restarts that sshd through
``docker/facility/sshd-ctl``). Jobs left by a test are cancelled when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from xffl_airflow.hooks import slurm_poller
from xffl_airflow.hooks.slurm import remote_command_count
from xffl_airflow.triggers.slurm import SlurmJobTrigger

from tests.plugins.xffl_airflow.hooks.slurm_support import (
    capture_logs,
    facility_of_tests,
    first_event,
    job_state,
    wait_until,
)

COMMENT = "xffl/slurm_trigger_tests/run/t/-1"


@pytest.fixture
def site1(testbed, monkeypatch):
    yield from facility_of_tests(testbed, monkeypatch, "site1", lambda comment: comment == COMMENT)


def submit(facility, script: str, *extra: str) -> tuple[str, str]:
    """sbatch over ssh; returns (job id, log path)."""
    log = f"{facility.workdir}/trigger-tests-%j.log"
    options = " ".join([f"--comment={COMMENT}", f"--output={log}", *extra])
    job_id = facility.ssh(
        f"cd xffl && sbatch --parsable {options} --wrap {shlex.quote(script)}"
    ).stdout.strip()
    return job_id, log.replace("%j", job_id)


def trigger_for(facility, job_id: str, log_path: str | None = None, **kwargs) -> SlurmJobTrigger:
    kwargs.setdefault("poll_interval", 2)
    return SlurmJobTrigger(ssh_conn_id=facility.conn_id, job_id=job_id, log_path=log_path, **kwargs)


def rebuilt(trigger: SlurmJobTrigger) -> SlurmJobTrigger:
    """What a triggerer does: the class from its path, the kwargs through JSON."""
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))


def test_serialize_is_exactly_the_constructor_state():
    trigger = SlurmJobTrigger(ssh_conn_id="facility_x", job_id="42", log_path="/w/a-42.log", log_offset=7,
                              poll_interval=12, log_tail_lines=9, follow_log=False,
                              timeout_at="2030-01-01T00:00:00+00:00", cancel_on_kill=True, lost_after=5)  # fmt: skip
    classpath, kwargs = trigger.serialize()
    assert classpath == "xffl_airflow.triggers.slurm.SlurmJobTrigger"
    assert rebuilt(trigger).serialize() == (classpath, kwargs)
    assert kwargs["log_offset"] == 7 and kwargs["cancel_on_kill"] is True


def test_a_trigger_refuses_an_unsafe_job_id():
    with pytest.raises(ValueError, match="job_id"):
        SlurmJobTrigger(ssh_conn_id="c", job_id="1; touch /tmp/pwned")
def test_exactly_one_event_then_the_trigger_ends(site1):
    job_id, log = submit(site1, "echo one; echo two")

    async def all_events():
        return [event.payload async for event in trigger_for(site1, job_id, log).run()]

    events = asyncio.run(all_events())
    assert len(events) == 1
    event = events[0]
    assert (event["status"], event["state"], event["job_id"], event["exit_code"]) == (
        "success",
        "COMPLETED",
        job_id,
        "0:0",
    )
    assert event["log_tail"] == ["one", "two"] and event["log_offset"] == len("one\ntwo\n")
    assert (
        event["message"]
        == f"Slurm job {job_id} on {site1.conn_id}: ended COMPLETED (exit code 0:0)"
    )
def test_rebuilt_from_serialize_mid_job_it_reports_the_right_end(site1):
    job_id, log = submit(site1, "for i in $(seq 1 12); do echo tick $i; sleep 1; done; exit 5")
    trigger = trigger_for(site1, job_id, log)

    async def run_until_dropped():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.to_thread(
            wait_until,
            lambda: Path(log).exists() and "tick 3" in Path(log).read_text(),
            what="job running",
        )
        task.cancel()  # the triggerer stops (restart, redistribution): the trigger is dropped
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(run_until_dropped())
    assert job_state(site1, job_id) == "RUNNING"  # dropping a trigger never touches the job
    with capture_logs() as logs:
        event = asyncio.run(first_event(rebuilt(trigger)))  # another triggerer, another loop
    assert (event["status"], event["state"], event["exit_code"]) == ("failed", "FAILED", "5:0")
    assert event["log_tail"][-1] == "tick 12"
    assert logs.containing(f"[job {job_id}] tick 12")
def test_sshd_stopped_and_restarted_mid_job(site1):
    job_id, log = submit(site1, "for i in $(seq 1 20); do echo tick $i; sleep 1; done")
    trigger = trigger_for(site1, job_id, log, poll_interval=2)

    async def scenario():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.to_thread(
            wait_until,
            lambda: Path(log).exists() and "tick 2" in Path(log).read_text(),
            what="job running",
        )
        await asyncio.to_thread(site1.stop_sshd)
        await asyncio.sleep(8)
        assert not task.done()  # no answer is not an answer
        await asyncio.to_thread(site1.start_sshd)
        return await task

    with capture_logs() as logs:
        event = asyncio.run(scenario())
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    assert logs.containing(f"Slurm at {site1.conn_id} not answering, still waiting")
    assert logs.containing(f"Slurm at {site1.conn_id} answers again")
    ticks = [line.split("] ", 1)[1] for line in logs.containing(f"[job {job_id}] tick")]
    assert ticks == [f"tick {i}" for i in range(1, 21)]  # every line once, none lost over the gap
def test_an_unknown_job_is_never_read_as_failed(site1):
    """A job no source can tell about (here: sacct -c is not readable by the facility user)."""
    soon = (datetime.now(UTC) + timedelta(seconds=6)).isoformat()
    event = asyncio.run(first_event(trigger_for(site1, "987654", timeout_at=soon)))
    assert event["status"] == "timeout" and event["state"] is None
    assert "still in an unknown state" in event["message"]
def test_on_kill_cancels_the_job_when_asked(site1):
    job_id, _ = submit(site1, "sleep 120")
    wait_until(lambda: job_state(site1, job_id) in ("RUNNING", "PENDING"), what="job queued")
    asyncio.run(trigger_for(site1, job_id, cancel_on_kill=False).on_kill())
    assert job_state(site1, job_id) in ("RUNNING", "PENDING")
    asyncio.run(trigger_for(site1, job_id, cancel_on_kill=True).on_kill())
    wait_until(lambda: job_state(site1, job_id) == "CANCELLED", what="job cancelled")
def test_triggers_of_one_facility_share_one_connection_and_one_squeue(site1, monkeypatch):
    """Eight triggers cost what one costs: one SSH connection, one remote command per poll."""
    connections = []
    original = slurm_poller._default_connector

    async def counting_connector(conn_id):
        connections.append(conn_id)
        return await original(conn_id)

    monkeypatch.setattr(slurm_poller, "_default_connector", counting_connector)
    held = [submit(site1, "true", "--hold")[0] for _ in range(8)]

    async def watch_for(seconds: float, job_ids: list[str]) -> int:
        before = remote_command_count(site1.conn_id)
        tasks = [
            asyncio.create_task(first_event(trigger_for(site1, j, poll_interval=30)))
            for j in job_ids
        ]
        await asyncio.sleep(seconds)
        pollers = slurm_poller._POLLERS[asyncio.get_running_loop()]
        assert list(pollers) == [site1.conn_id] and len(pollers[site1.conn_id].watches) == len(
            job_ids
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return remote_command_count(site1.conn_id) - before

    one = asyncio.run(watch_for(8, held[:1]))
    eight = asyncio.run(watch_for(8, held))
    assert connections == [site1.conn_id, site1.conn_id]  # one connection per triggerer loop
    assert 3 <= one <= 7  # about 1 s apart at first, backing off
    assert eight <= one + 1
    site1.ssh("scancel " + " ".join(held))
def test_a_job_whose_log_lags_is_drained_before_the_end(site1):
    """More log than one poll reads (256 KiB): the final event waits until all of it was shown."""
    job_id, log = submit(site1, "python3 -c \"print('\\n'.join('x' * 99 for _ in range(6000)))\"")
    with capture_logs() as logs:
        event = asyncio.run(first_event(trigger_for(site1, job_id, log, log_tail_lines=3)))
    assert event["status"] == "success" and event["log_offset"] == 600_000
    assert len(logs.containing(f"[job {job_id}] ")) == 6000
    assert event["log_tail"] == ["x" * 99] * 3
