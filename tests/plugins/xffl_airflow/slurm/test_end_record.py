"""The end record a job writes beside its log, for clusters that forget ended jobs (no
accounting, short MinJobAge): the batch script writes it (run here by bash, no Slurm), the
strict parser reads it back, and the resolve step uses it only when Slurm knows nothing.

Unit level: the rendered script runs under the local bash with a fake ``SLURM_JOB_ID``; the
poller is fed literal answers through a fake SSH connection. Nothing else is started.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import time

import pytest
from xffl_airflow.hooks.slurm import SlurmClient
from xffl_airflow.hooks.slurm_poller import FacilityPoller
from xffl_airflow.slurm import SbatchOptions, render_batch_script
from xffl_airflow.slurm.commands import build_resolve_script
from xffl_airflow.slurm.end_records import end_record_answer, parse_end_record
from xffl_airflow.slurm.parsing import Section
from xffl_airflow.slurm.script import end_record_path, time_limit_seconds
from xffl_airflow.triggers import slurm as trigger_module

from tests.plugins.xffl_airflow.hooks.fake_shell import answer, unwrap

OK = b"xffl-end 1 job=42 rc=0 signal= start=1767225600 end=1767225660 limit=\n"


def test_records_map_to_slurm_states():
    job = parse_end_record(OK, job_id="42", tz="+0100")
    assert (job.state, job.exit_code, job.reason, job.phase.value) == (
        "COMPLETED",
        "0:0",
        None,
        "success",
    )
    assert (job.start_time, job.end_time, job.source) == (
        "2026-01-01T01:00:00",
        "2026-01-01T01:01:00",
        "end-record",
    )
    failed = parse_end_record(OK.replace(b"rc=0", b"rc=3"), job_id="42")
    assert (failed.state, failed.exit_code, failed.phase.value) == ("FAILED", "3:0", "failure")
    cancelled = b"xffl-end 1 job=42 rc=143 signal=TERM start=100 end=130 limit=600"
    assert parse_end_record(cancelled, job_id="42").state == "CANCELLED"
    timed_out = b"xffl-end 1 job=42 rc=1 signal=TERM start=100 end=695 limit=600\n"
    job = parse_end_record(timed_out, job_id="42")
    assert (job.state, job.exit_code, job.reason) == ("TIMEOUT", "0:15", "TimeLimit")
    no_limit = b"xffl-end 1 job=42 rc=143 signal=TERM start=100 end=9999 limit=\n"
    assert parse_end_record(no_limit, job_id="42").state == "CANCELLED"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"xffl-end 1 job=42 rc=0\n",  # fields missing
        OK.replace(b"job=42", b"job=43"),  # another job's
        OK.replace(b"rc=0", b"rc=256"),
        OK.replace(b"rc=0", b"rc=-1"),
        OK.replace(b"signal=", b"signal=KILL"),
        OK.replace(b"start=1767225600", b"start=1767225999"),  # ends before it starts
        OK.replace(b"xffl-end 1", b"xffl-end 2"),
        OK + OK,  # two lines
        OK.replace(b"\n", b"\r\n"),
        OK.replace(b"\n", b" extra=1\n"),
        OK.replace(b"rc=0", b"rc=\xd9\xa0"),  # an Arabic-Indic zero
        OK[:-1] + b" " * 300 + b"\n",  # too long
    ],
)
def test_a_bad_record_is_unknown_never_success(data):
    assert parse_end_record(data, job_id="42") is None


def test_the_resolve_section_is_base64_and_bounded():
    encoded = base64.b64encode(OK).decode()
    assert (
        end_record_answer(Section("end", "42", encoded, 0), job_id="42", tz=None).state
        == "COMPLETED"
    )
    assert end_record_answer(Section("end", "42", "", 1), job_id="42", tz=None) is None  # no file
    assert end_record_answer(Section("end", "42", encoded + "!", 0), job_id="42", tz=None) is None
    assert end_record_answer(Section("end", "42", encoded, None), job_id="42", tz=None) is None
    script = build_resolve_script(["42", "43"], {"42": "/w/a-42.log.end", "7": "/w/x.end"})
    assert "test -f /w/a-42.log.end && head -c 257 -- /w/a-42.log.end | base64 -w 0" in script
    assert "@@xffl begin %s\\n' 'end 42'" in script and "/w/x.end" not in script


def test_record_paths_and_time_limits():
    assert end_record_path("/w/a-42.log") == "/w/a-42.log.end"
    assert end_record_path("/w/a-%j.log") is None and end_record_path(None) is None
    assert [
        time_limit_seconds(t) for t in ("30", "0:01", "2:00:00", "1-12", "1-12:00:00", "1-0:1:2")
    ] == [
        1800,
        1,
        7200,
        129600,
        129600,
        86462,
    ]
    assert time_limit_seconds("UNLIMITED") is None and time_limit_seconds(None) is None


def script_for(
    tmp_path, command: str, *, output: str | None = None, time: str | None = None
) -> str:
    return render_batch_script(
        SbatchOptions.from_dict({"time": time} if time else {}), command=command, job_name="t.job",
        comment="xffl/d/r/t/-1", workdir=str(tmp_path), output=output or f"{tmp_path}/t.job-%j.log",
        env={},
    )  # fmt: skip


def run_job(tmp_path, script: str, *, term_after: float | None = None) -> int:
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {**os.environ, "SLURM_JOB_ID": "42"}
    with open(tmp_path / "t.job-42.log", "ab") as log:
        process = subprocess.Popen(
            ["bash", str(path)], env=env, stdout=log, stderr=log, cwd=tmp_path
        )
        if term_after is not None:
            time.sleep(term_after)
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout=20)


@pytest.mark.parametrize(
    ("command", "rc"), [("echo fine", 0), ("echo bad\nexit 3", 3), ("false\necho never", 1)]
)
def test_the_script_records_the_end_and_keeps_the_exit_status(tmp_path, command, rc):
    (tmp_path / "t.job-42.log.end").write_text("stale record of an earlier run\n")
    assert run_job(tmp_path, script_for(tmp_path, command)) == rc
    record = (tmp_path / "t.job-42.log.end").read_bytes()
    assert re.fullmatch(rb"xffl-end 1 job=42 rc=%d signal= start=\d+ end=\d+ limit=\n" % rc, record)
    assert parse_end_record(record, job_id="42").phase.value == (
        "success" if rc == 0 else "failure"
    )
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    assert "never" not in (tmp_path / "t.job-42.log").read_text()


def test_a_terminated_job_records_the_signal(tmp_path):
    rc = run_job(tmp_path, script_for(tmp_path, "echo started\nsleep 30", time="5"), term_after=1.0)
    record = (tmp_path / "t.job-42.log.end").read_bytes()
    # the script ends by the signal itself, so Slurm records 0:15 (as without the trap)
    assert rc == -15 and b" signal=TERM " in record and record.endswith(b" limit=300\n")
    assert parse_end_record(record, job_id="42").state == "CANCELLED"


def test_output_patterns_the_script_cannot_fill_in_write_no_record(tmp_path):
    assert run_job(tmp_path, script_for(tmp_path, "true", output=f"{tmp_path}/t.job-%N.log")) == 0
    assert list(tmp_path.glob("*.end")) == []
    named = script_for(tmp_path, "true", output=f"{tmp_path}/%x-%j.log")
    assert f'xffl_end={tmp_path}/t.job-"${{SLURM_JOB_ID}}".log.end' in named


class ForgetfulFacility:
    """A cluster without accounting whose slurmctld already purged jobs 42 and 43: squeue and
    scontrol do not know them, sacct fails; job 42 left an end record, 43 did not."""

    def __init__(self):
        self.records = {"/w/a-42.log.end": OK.replace(b"rc=0", b"rc=3")}

    async def run(self, command, *, input, encoding, check, timeout):
        command, nonce = unwrap(command)
        script = input.decode()
        out = ["@@xffl tz +0000"]
        if "squeue" in script:
            out += ["@@xffl begin squeue", "", "@@xffl end 0"]
        if "sacct" in script:
            out += [
                "@@xffl begin sacct",
                "sacct: error: Slurm accounting storage is disabled",
                "@@xffl end 1",
            ]
            out += ["@@xffl begin sacct-c", "sacct: fatal: open /var/log/jobcomp.txt: Permission denied", "@@xffl end 1"]  # fmt: skip
            for job in re.findall(r"scontrol show -o job (\d+)", script):
                out += [f"@@xffl begin scontrol {job}", "slurm_load_jobs error: Invalid job id specified", "@@xffl end 1"]  # fmt: skip
            for path in re.findall(r"test -f (\S+) &&", script):
                job = re.search(r"a-(\d+)", path).group(1)
                record = self.records.get(path)
                text = base64.b64encode(record).decode() if record else ""
                out += [f"@@xffl begin end {job}", text, f"@@xffl end {0 if record else 1}"]
        return answer(nonce, ("\n".join(out) + "\n").encode())

    def close(self):
        pass

    async def wait_closed(self):
        pass


def test_a_forgotten_job_reads_its_record_and_one_without_is_vanished_not_failed(monkeypatch):
    facility = ForgetfulFacility()

    async def connector(conn_id):
        return SlurmClient(conn_id, facility)

    async def scenario():
        poller = FacilityPoller("site1", connector=connector)
        async with (
            poller.watch("42", log_path="/w/a-42.log", follow_log=False, tail_lines=0) as recorded,
            poller.watch("43", log_path="/w/a-43.log", follow_log=False, tail_lines=0) as silent,
        ):
            return await asyncio.wait_for(recorded.updates.get(), 5), await asyncio.wait_for(
                silent.updates.get(), 5
            )

    recorded, silent = asyncio.run(scenario())
    assert recorded.final and (recorded.job.state, recorded.job.exit_code) == ("FAILED", "3:0")
    assert silent.job is None and silent.lost and silent.vanished and not silent.final
    for update in (recorded, silent):
        assert "accounting storage is disabled" in update.accounting
        assert "Permission denied" in update.accounting
    message = trigger_module._vanished("43", 600, silent.accounting, "/w/a-43.log")
    for words in (
        "cannot be learned",
        "MinJobAge",
        "Permission denied",
        "/w/a-43.log.end",
        "slurmdbd",
        "jobcomp/filetxt",
    ):
        assert words in message
