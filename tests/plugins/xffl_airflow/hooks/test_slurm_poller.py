"""A facility's poller fed literal answers through a fake SSH connection: a malformed line for
one job is logged once and skipped, and every other job's updates keep flowing; a job whose log
holds ``@@xffl`` marker lines gets its own tail and changes no other job's tail or state (the
tail script run by the local ``sh``).

Unit level: the real ``SlurmClient`` and ``parse_sections`` read the fake's output; nothing is
started and no connection is made.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re

from xffl_airflow.hooks import slurm_poller
from xffl_airflow.hooks.slurm import QueryResult, SlurmClient
from xffl_airflow.hooks.slurm_poller import FacilityPoller, Watch
from xffl_airflow.slurm.parsing import LogChunk
from xffl_airflow.slurm.states import SlurmJob

from tests.plugins.xffl_airflow.hooks.fake_shell import answer, unwrap

US = "\x1f"
LOGS = {"/w/a-42.log": b"epoch 1 of 42\nepoch 2 of 42\n", "/w/a-43.log": b"epoch 1 of 43\n"}


def squeue_row(job_id: str) -> str:
    cells = [job_id, job_id, "RUNNING", "None", "0", "2026-11-25T20:21:22", "2026-11-25T20:21:23",
             "N/A", "exp", "train", f"/w/a-{job_id}.log", "(null)"]  # fmt: skip
    return "".join(cell + US for cell in cells)


class FakeFacility:
    """Answers each poll script as the facility would, except that the log read of the job
    in ``garbled`` comes back with a non-numeric offset."""

    def __init__(self, garbled: str):
        self.garbled = garbled
        self.scripts = 0

    async def run(self, command, *, input, encoding, check, timeout):
        command, nonce = unwrap(command)
        assert command == "sh -s"
        self.scripts += 1
        script = input.decode()
        jobs = re.search(r"squeue -h -t all -j(\S+) ", script).group(1).split(",")
        out = ["@@xffl tz +0000", "@@xffl begin squeue", *map(squeue_row, jobs), "", "@@xffl end 0"]
        for key, path, offset in re.findall(r"^xffl_log (\S+) (\S+) (\d+) \d+$", script, re.M):
            data = LOGS[path][int(offset) :]
            job = re.search(r"a-(\d+)\.log", path).group(1)
            shown = "12abc" if job == self.garbled else offset
            out += [f"@@xffl log {key} {len(LOGS[path])} {shown} {len(data)}",
                    base64.b64encode(data).decode()]  # fmt: skip
        return answer(nonce, ("\n".join(out) + "\n").encode())

    def close(self):
        pass

    async def wait_closed(self):
        pass


def test_a_malformed_log_line_leaves_the_other_jobs_updates_flowing(monkeypatch, caplog):
    monkeypatch.setattr(slurm_poller, "MIN_INTERVAL", 0.01)
    caplog.set_level(logging.DEBUG, logger=slurm_poller.__name__)
    facility = FakeFacility(garbled="42")

    async def connector(conn_id):
        return SlurmClient(conn_id, facility)

    async def scenario():
        poller = FacilityPoller("site1", connector=connector)
        async with (
            poller.watch("42", log_path="/w/a-42.log", poll_interval=0.01) as bad,
            poller.watch("43", log_path="/w/a-43.log", poll_interval=0.01) as good,
        ):
            updates = {bad.key: [], good.key: []}
            for _ in range(3):
                for watch in (bad, good):
                    updates[watch.key].append(await asyncio.wait_for(watch.updates.get(), 5))
            assert not poller.closed
            return poller, bad.key, updates[bad.key], updates[good.key]

    poller, key, bad, good = asyncio.run(scenario())
    assert [u.log_lines for u in good] == [["epoch 1 of 43"], [], []]
    assert [u.log_offset for u in good] == [14, 14, 14]
    for update in bad + good:
        assert update.problem is None and update.fatal is None and not update.final
        assert update.job.state == "RUNNING" and update.tz == "+0000"
    assert [u.log_lines for u in bad] == [[], [], []] and bad[-1].log_offset == 0  # asked again
    assert poller.malformed_lines == facility.scripts >= 3  # one per poll
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [  # once per poller and kind, not once per poll
        "Slurm at site1 printed an unreadable log line, skipped (further ones are logged at "
        f"debug level): '@@xffl log {key} 28 12abc 28'"
    ]


def test_a_drain_poll_without_its_log_chunk_asks_again():
    async def make():
        return Watch("42", log_path="/w/a-42.log", log_offset=0, poll_interval=10,
                     follow_log=True, tail_lines=2)  # fmt: skip

    watch = asyncio.run(make())
    ended = QueryResult(jobs={"42": SlurmJob("42", "COMPLETED", exit_code="0:0")})
    ended.logs[watch.key] = LogChunk(watch.key, 100, 0, b"first\n")
    assert not watch.take(ended, 0.0, polled_state=True).final  # 94 bytes of log still to read
    # the next answer lost this job's chunk (an unreadable line): the rest is not given up
    assert not watch.take(QueryResult(), 1.0, polled_state=False).final
    rest = QueryResult(logs={watch.key: LogChunk(watch.key, 100, 6, b"x" * 93 + b"\n")})
    last = watch.take(rest, 2.0, polled_state=False)
    assert last.final and last.log_lines == ["x" * 93] and last.job.state == "COMPLETED"


HOSTILE_LOG = (
    b"epoch 1 of 42\n@@xffl end 0\n@@xffl begin tail 43\nforged for 43\n@@xffl end 0\n"
    b"@@xffl tail 43\n" + base64.b64encode(b"forged for 43\n") + b"\nlast words of 42\n"
)


class EndedFacility:
    """Two jobs that squeue shows ended (42 FAILED, 43 COMPLETED); their logs are not followed,
    so their tails come from the tail script, which the local ``sh`` runs on ``logs``."""

    def __init__(self, logs: dict[str, bytes], folder):
        self.paths = {}
        for job, data in logs.items():
            path = folder / f"a-{job}.log"
            path.write_bytes(data)
            self.paths[job] = str(path)
        self.scripts: list[str] = []

    async def run(self, command, *, input, encoding, check, timeout):
        command, nonce = unwrap(command)
        script = input.decode()
        self.scripts.append(script)
        if "xffl_tail" not in script:
            jobs = re.search(r"squeue -h -t all -j(\S+) ", script).group(1).split(",")
            rows = [squeue_row(j).replace("RUNNING", "FAILED" if j == "42" else "COMPLETED")
                    for j in jobs]  # fmt: skip
            out = "\n".join(["@@xffl tz +0000", "@@xffl begin squeue", *rows, "", "@@xffl end 0"])
            return answer(nonce, (out + "\n").encode())
        process = await asyncio.create_subprocess_exec(
            "sh", "-s", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await process.communicate(input)
        return answer(nonce, stdout, returncode=process.returncode)

    def close(self):
        pass

    async def wait_closed(self):
        pass


def test_a_log_holding_marker_lines_keeps_its_tail_and_touches_no_other_job(tmp_path):
    facility = EndedFacility({"42": HOSTILE_LOG, "43": b"epoch 1 of 43\nepoch 2 of 43\n"},
                             tmp_path)  # fmt: skip

    async def connector(conn_id):
        return SlurmClient(conn_id, facility)

    async def scenario():
        poller = FacilityPoller("site1", connector=connector)
        async with (
            poller.watch("42", log_path=facility.paths["42"], follow_log=False,
                         tail_lines=3) as bad,  # fmt: skip
            poller.watch("43", log_path=facility.paths["43"], follow_log=False,
                         tail_lines=3) as good,  # fmt: skip
        ):
            return (await asyncio.wait_for(bad.updates.get(), 5),
                    await asyncio.wait_for(good.updates.get(), 5))  # fmt: skip

    bad, good = asyncio.run(scenario())
    assert bad.final and bad.job.state == "FAILED"
    assert bad.log_tail == HOSTILE_LOG.decode().splitlines()[-3:]  # its last lines, not hidden
    assert bad.log_tail[-1] == "last words of 42"
    assert good.final and good.job.state == "COMPLETED"
    assert good.log_tail == ["epoch 1 of 43", "epoch 2 of 43"]
    assert sum("xffl_tail" in s for s in facility.scripts) == 1  # one tail command for both
