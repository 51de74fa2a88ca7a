"""A poller's Watch filing literal poll answers: log lines split across polls, a log that
shrank, the last update held back until the log was read to its end, the poll schedule.

Pure logic: nothing is started, no connection is made.
"""

from __future__ import annotations

import asyncio

from xffl_airflow.hooks.slurm import QueryResult
from xffl_airflow.hooks.slurm_poller import GROWTH, MIN_INTERVAL, Watch
from xffl_airflow.slurm.parsing import LogChunk
from xffl_airflow.slurm.states import SlurmJob


def new_watch(**kwargs) -> Watch:
    async def make():  # an asyncio.Queue wants a loop in older Pythons
        return Watch("42", **{"log_path": "/w/a-42.log", "log_offset": 0, "poll_interval": 10,
                              "follow_log": True, "tail_lines": 2, **kwargs})  # fmt: skip

    return asyncio.run(make())


def answer(watch: Watch, state: str | None, data: bytes = b"", *, offset: int | None = None, size: int | None = None,
           exit_code: str | None = "0:0") -> QueryResult:  # fmt: skip
    result = QueryResult(tz="+0000")
    if state is not None:
        result.jobs["42"] = SlurmJob("42", state, exit_code=exit_code)
    start = watch.offset if offset is None else offset
    result.logs[watch.key] = LogChunk(
        watch.key, start + len(data) if size is None else size, start, data
    )
    return result


def test_lines_split_across_polls_come_out_whole():
    watch = new_watch()
    first = watch.take(
        answer(watch, "RUNNING", b"epoch 1 loss 0.9\nepoch 2 lo"), 0.0, polled_state=True
    )
    assert first.log_lines == ["epoch 1 loss 0.9"] and not first.final
    second = watch.take(answer(watch, "RUNNING", b"ss 0.7\n"), 1.0, polled_state=True)
    assert second.log_lines == ["epoch 2 loss 0.7"] and second.log_offset == len(
        b"epoch 1 loss 0.9\nepoch 2 loss 0.7\n"
    )


def test_a_log_that_shrank_starts_over():
    watch = new_watch()
    watch.take(answer(watch, "RUNNING", b"old line\nhalf"), 0.0, polled_state=True)
    update = watch.take(answer(watch, "RUNNING", b"new\n", offset=0), 1.0, polled_state=True)
    assert update.log_lines == ["new"] and watch.offset == 4


def test_the_end_waits_until_the_log_was_read_to_its_end():
    watch = new_watch()
    # the job ended, but this poll read only part of its log
    update = watch.take(
        answer(watch, "FAILED", b"a\nb\n", size=100, exit_code="3:0"), 0.0, polled_state=True
    )
    assert not update.final and watch.next_due == MIN_INTERVAL
    # the next poll (no squeue for it any more) reads the rest, the last line without newline
    last = watch.take(answer(watch, None, b"c\nlast words"), 1.0, polled_state=False)
    assert last.final and last.job.state == "FAILED" and last.log_lines == ["c", "last words"]
    assert last.log_tail == ["c", "last words"]


def test_an_ended_job_with_no_log_ends_at_once():
    watch = new_watch()
    update = watch.take(
        answer(watch, "CANCELLED", size=-1, exit_code="0:0"), 0.0, polled_state=True
    )
    assert update.final and update.log_tail == [] and update.log_lines == []


def test_unknown_and_lost_are_not_final():
    watch = new_watch()
    unknown = QueryResult()
    assert not watch.take(unknown, 0.0, polled_state=True).final
    lost = QueryResult(lost={"42"})
    update = watch.take(lost, 1.0, polled_state=True)
    assert update.lost and not update.final and update.job is None


def test_polls_back_off_towards_the_poll_interval():
    watch = new_watch(follow_log=False)
    gaps = []
    now = 0.0
    for _ in range(10):
        watch.take(QueryResult(jobs={"42": SlurmJob("42", "PENDING")}), now, polled_state=True)
        gaps.append(round(watch.next_due - now, 3))
        now = watch.next_due
    assert gaps[:3] == [MIN_INTERVAL, MIN_INTERVAL * GROWTH, MIN_INTERVAL * GROWTH**2]
    assert gaps[-1] == 10 and sorted(gaps) == gaps
    assert watch.log_read() is None  # not following the log: nothing to read
