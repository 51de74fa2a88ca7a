"""Parsing what Slurm 22.05 printed: literal outputs captured from the local facilities (and,
for sacct with slurmdbd, in the format real sites print). A failed query is None, never failure.

Pure functions only: nothing is started.
"""

from __future__ import annotations

import base64

import pytest
from xffl_airflow.slurm.errors import SlurmOutputError
from xffl_airflow.slurm.parsing import (
    Malformed,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_sections,
    parse_squeue,
    sacct_answer,
    sbatch_error,
    scontrol_answer,
    squeue_answer,
    tz_offset_seconds,
)
from xffl_airflow.slurm.states import Phase

US = "\x1f"


def row(*cells):
    return US.join(cells) + US


# squeue -h -t all -O JobArrayID,JobID,State,Reason,exit_code,SubmitTime,StartTime,EndTime,Cluster,Name,STDOUT,Comment
SQUEUE = "\n".join(
    [
        row("1", "1", "COMPLETED", "None", "0", "2026-11-25T20:21:22", "2026-11-25T20:21:22", "2026-11-25T20:21:23",
            "exp", "wrap", "/home/u/xffl/slurm-1.out", "(null)"),
        row("2", "2", "FAILED", "NonZeroExitCode", "768", "2026-11-25T20:21:22", "2026-11-25T20:21:22",
            "2026-11-25T20:21:22", "exp", "wrap", "/home/u/xffl/slurm-2.out", "xffl/d/r/t/-1"),
        row("13", "13", "TIMEOUT", "TimeLimit", "15", "2026-11-25T20:24:42", "2026-11-25T20:24:42",
            "2026-11-25T20:25:42", "exp", "wrap", "/home/u/xffl/slurm-13.out", "(null)"),
        row("7_[2-4%1]", "7", "PENDING", "JobArrayTaskLimit", "0", "2026-11-25T20:23:29", "N/A", "N/A", "exp",
            "wrap", "/home/u/xffl/slurm-7.out", "(null)"),
        row("7_1", "10", "RUNNING", "None", "0", "2026-11-25T20:23:29", "2026-11-25T20:23:30", "NONE", "exp",
            "wrap", "/home/u/xffl/slurm-10.out", "(null)"),
        row("8+0", "8", "PENDING", "Resources", "0", "2026-11-25T20:23:29", "2026-11-25T20:23:59", "NONE", "exp",
            "sbatch", "/home/u/xffl/slurm-8.out", "(null)"),
        row("8+1", "9", "PENDING", "Resources", "0", "2026-11-25T20:23:29", "N/A", "N/A", "exp", "sbatch",
            "/home/u/xffl/slurm-9.out", "(null)"),
    ]
)  # fmt: skip


def test_squeue_rows():
    jobs = {j.job_id: j for j in parse_squeue(SQUEUE)}
    assert (
        jobs["1"].phase is Phase.SUCCESS
        and jobs["1"].exit_code == "0:0"
        and jobs["1"].cluster == "exp"
    )
    assert (jobs["2"].state, jobs["2"].exit_code, jobs["2"].reason) == (
        "FAILED",
        "3:0",
        "NonZeroExitCode",
    )
    assert jobs["2"].comment == "xffl/d/r/t/-1" and jobs["1"].comment is None
    assert (jobs["13"].state, jobs["13"].exit_code, jobs["13"].reason) == (
        "TIMEOUT",
        "0:15",
        "TimeLimit",
    )
    assert jobs["7_1"].raw_id == "10" and jobs["7_1"].end_time is None
    assert jobs["7_[2-4%1]"].start_time is None and jobs["8+1"].raw_id == "9"
    assert jobs["2"].stdout == "/home/u/xffl/slurm-2.out"


def test_squeue_with_too_few_fields_is_refused():
    with pytest.raises(SlurmOutputError, match="expected 12"):
        parse_squeue(row("1", "1", "RUNNING"))


def section_output(name, text, rc, arg=None):
    header = f"{name} {arg}" if arg else name
    return f"@@xffl begin {header}\n{text}\n\n@@xffl end {rc}\n"


def test_squeue_answers():
    out = parse_sections("@@xffl tz +0100\n" + section_output("squeue", SQUEUE, 0))
    assert out.tz == "+0100" and len(squeue_answer(out.section("squeue"))) == 7
    # one job id, purged: a real answer ("holds none")
    purged = parse_sections(
        section_output("squeue", "slurm_load_jobs error: Invalid job id specified", 1)
    )
    assert squeue_answer(purged.section("squeue")) == []
    # controller down: no answer
    down = parse_sections(
        section_output(
            "squeue",
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
            1,
        )
    )
    assert squeue_answer(down.section("squeue")) is None
    # the script was cut off mid-way (link dropped)
    cut = parse_sections("@@xffl begin squeue\n" + row("1", "1", "RUNNING"))
    assert squeue_answer(cut.section("squeue")) is None
    assert squeue_answer(None) is None


# sacct -X -n -P --delimiter=US -o JobID,JobIDRaw,State,ExitCode,Reason,Submit,Start,End,Cluster,JobName,Comment
# as a site with slurmdbd prints it: arrays, het jobs, "CANCELLED by UID", a requeued job twice.
SACCT = "\n".join(
    [
        US.join(["4242", "4242", "COMPLETED", "0:0", "None", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:30:00", "leonardo", "xffl.train", "xffl/d/r/t/-1"]),
        US.join(["4243", "4243", "CANCELLED by 0", "0:15", "None", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:01:00", "leonardo", "x", ""]),
        US.join(["4250_1", "4251", "COMPLETED", "0:0", "None", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:00:05", "leonardo", "arr", ""]),
        US.join(["4250_2", "4250", "OUT_OF_MEMORY", "0:125", "OutOfMemory", "2026-01-01T10:00:00",
                 "2026-01-01T10:00:01", "2026-01-01T10:00:05", "leonardo", "arr", ""]),
        US.join(["4260+0", "4260", "NODE_FAIL", "0:0", "NodeDown", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:00:05", "leonardo", "het", ""]),
        US.join(["4260+1", "4261", "CANCELLED", "0:15", "None", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:00:05", "leonardo", "het", ""]),
        US.join(["4270", "4270", "REQUEUED", "0:0", "None", "2026-01-01T10:00:00", "2026-01-01T10:00:01",
                 "2026-01-01T10:00:05", "leonardo", "rq", ""]),
        US.join(["4270", "4270", "RUNNING", "0:0", "None", "2026-01-01T10:00:06", "2026-01-01T10:00:07",
                 "Unknown", "leonardo", "rq", ""]),
        US.join(["4270.batch", "4270.batch", "RUNNING", "0:0", "", "", "", "", "leonardo", "batch", ""]),
    ]
)  # fmt: skip


def test_sacct_rows():
    jobs = {j.job_id: j for j in parse_sacct(SACCT)}
    assert jobs["4242"].phase is Phase.SUCCESS and jobs["4242"].comment == "xffl/d/r/t/-1"
    assert jobs["4243"].state == "CANCELLED" and jobs["4243"].phase is Phase.FAILURE
    assert jobs["4250_2"].state == "OUT_OF_MEMORY" and jobs["4250_2"].raw_id == "4250"
    assert jobs["4260+0"].state == "NODE_FAIL"
    assert jobs["4270"].state == "RUNNING" and jobs["4270"].end_time is None  # the last row wins
    assert "4270.batch" not in jobs


# sacct -c (the completion log, accounting storage disabled), as the local facilities print it
SACCT_C = "\n".join(
    [
        US.join(["2", "2", "FAILED", "3:0", "", "2026-11-25T20:21:22", "2026-11-25T20:21:22", "2026-11-25T20:21:22",
                 "unknown", "wrap", ""]),
        US.join(["13", "13", "TIMEOUT", "0:0", "", "2026-11-25T20:24:42", "2026-11-25T20:24:42",
                 "2026-11-25T20:25:42", "unknown", "wrap", ""]),
    ]
)  # fmt: skip


def test_sacct_c_rows_and_answers():
    out = parse_sections(
        section_output("sacct", "Slurm accounting storage is disabled", 1)
        + section_output("sacct-c", "sacct: error: Unknown type ArrayJobId: 7\n" + SACCT_C, 0)
    )
    assert sacct_answer(out.section("sacct")) is None
    jobs = {j.job_id: j for j in sacct_answer(out.section("sacct-c"), source="sacct-c")}
    assert (
        jobs["2"].exit_code == "3:0" and jobs["2"].cluster is None and jobs["2"].source == "sacct-c"
    )
    assert jobs["13"].state == "TIMEOUT" and jobs["13"].phase is Phase.FAILURE
    denied = parse_sections(
        section_output("sacct-c", "sacct: fatal: open /x/jobcomp.txt: Permission denied", 1)
    )
    assert sacct_answer(denied.section("sacct-c")) is None


SCONTROL = (
    "JobId=16 JobName=wrap UserId=u(1001) GroupId=u(1001) MCS_label=N/A Priority=4294901747 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=2:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-25T20:28:52 EligibleTime=2026-11-25T20:28:52 AccrueTime=2026-11-25T20:28:52 "
    "StartTime=2026-11-25T20:28:53 EndTime=2026-11-25T20:28:53 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-25T20:28:53 Scheduler=Main Partition=debug AllocNode:Sid=localhost:22101 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=localhost BatchHost=localhost NumNodes=1 NumCPUs=1 "
    "NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* "
    "NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) "
    "DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/home/u/xffl Comment=xffl/d/r/t/-1  StdErr=/home/u/xffl/slurm-16.out StdIn=/dev/null "
    "StdOut=/home/u/xffl/slurm-16.out Power= \n"
    "JobId=20 ArrayJobId=19 ArrayTaskId=1 JobName=arr JobState=RUNNING Reason=None ExitCode=0:0 "
    "SubmitTime=2026-11-25T20:30:00 StartTime=2026-11-25T20:30:01 EndTime=Unknown StdOut=/x/a.out\n"
    "JobId=22 HetJobId=22 HetJobOffset=0 JobName=het JobState=PENDING Reason=Resources ExitCode=0:0 "
    "SubmitTime=2026-11-25T20:30:00 StartTime=N/A EndTime=N/A\n"
)


def test_scontrol_lines():
    jobs = {j.job_id: j for j in parse_scontrol(SCONTROL)}
    failed = jobs["16"]
    assert (failed.state, failed.exit_code, failed.reason) == ("FAILED", "2:0", "NonZeroExitCode")
    assert failed.comment == "xffl/d/r/t/-1" and failed.stdout == "/home/u/xffl/slurm-16.out"
    assert failed.start_time == "2026-11-25T20:28:53" and failed.end_time == "2026-11-25T20:28:53"
    assert jobs["19_1"].raw_id == "20" and jobs["19_1"].end_time is None
    assert jobs["22+0"].phase is Phase.WAITING


def test_scontrol_answers():
    ok = parse_sections(section_output("scontrol", SCONTROL, 0, arg="16"))
    assert len(scontrol_answer(ok.section("scontrol", "16"))) == 3
    purged = parse_sections(
        section_output("scontrol", "slurm_load_jobs error: Invalid job id specified", 1, "5")
    )
    assert scontrol_answer(purged.section("scontrol", "5")) == []
    down = parse_sections(
        section_output("scontrol", "slurm_load_jobs error: Socket timed out", 1, "5")
    )
    assert scontrol_answer(down.section("scontrol", "5")) is None


def test_log_chunks_are_read_exactly():
    data = b"line one\nline two with @@xffl end 0 inside\n\xff\xfe binary\n"
    encoded = base64.b64encode(data).decode()
    text = (
        f"@@xffl tz -0330\n@@xffl log w1 {len(data) + 100} 100 {len(data)}\n{encoded}\n"
        "@@xffl log w2 -1 0 0\n\n@@xffl log w3 10 0 0\n\n"
    )
    out = parse_sections(text)
    assert out.tz == "-0330" and tz_offset_seconds(out.tz) == -(3 * 3600 + 30 * 60)
    assert out.logs["w1"].data == data and out.logs["w1"].offset == 100
    assert out.logs["w1"].next_offset == 100 + len(data)
    assert out.logs["w2"].size == -1 and out.logs["w2"].data == b""
    assert out.logs["w3"].data == b""


def test_sbatch_parsable_output():
    assert parse_sbatch("17\n") == ("17", None)
    assert parse_sbatch("sbatch: warning: something\n4242;leonardo\n") == ("4242", "leonardo")
    with pytest.raises(SlurmOutputError, match="no job id"):
        parse_sbatch("Submitted batch job 17\n")
    assert (
        sbatch_error(
            "sbatch: error: invalid partition specified: nope\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
        )
        == "invalid partition specified: nope; Batch job submission failed: Invalid partition name specified"
    )
    assert sbatch_error("") == "no error message"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_malformed_log_line_is_skipped_and_the_others_are_read():
    text = (
        "@@xffl tz +0000\n"
        + section_output("squeue", row("1", "1", "RUNNING"), 0)
        + f"@@xffl log w1 12 abc 5\n{b64(b'hello')}\n"  # a non-numeric offset
        + f"@@xffl log w2 5 0 5\n{b64(b'hello')}\n"
        + f"@@xffl log w3 10 \u0663 5\n{b64(b'hello')}\n"  # int() reads an Arabic-Indic 3
        + "@@xffl log w4 10 0 4\n!!!!\n"  # not base64
        + f"@@xffl log w5 10 -2 5\n{b64(b'hello')}\n"
        + f"@@xffl log w6 10 0\n{b64(b'hello')}\n"  # a field short
        + "@@xffl log w7 10 0 4\n@@xffl bogus\n"  # the data line is missing
        + f"@@xffl log w8 8 3 5\n{b64(b'world')}\n"
    )
    out = parse_sections(text)
    assert sorted(out.logs) == ["w2", "w8"]
    assert out.logs["w2"].data == b"hello" and out.logs["w8"].next_offset == 8
    assert out.section("squeue").rc == 0 and out.tz == "+0000"
    assert out.malformed == [
        Malformed("log", "@@xffl log w1 12 abc 5"),
        Malformed("log", "@@xffl log w3 10 \u0663 5"),
        Malformed("log", "!!!!"),
        Malformed("log", "@@xffl log w5 10 -2 5"),
        Malformed("log", "@@xffl log w6 10 0"),
        Malformed("log", "@@xffl log w7 10 0 4"),
        Malformed("marker", "@@xffl bogus"),
    ]


def test_malformed_markers_are_skipped_and_recorded():
    out = parse_sections(
        "@@xffl tz 0100\n"
        "@@xffl begin\n"
        "@@xffl end 0\n"  # no section is open
        "@@xffl begin squeue\nslurm_load_jobs error\n@@xffl end one\n"
        "@@xffl begin sacct\u2028x y\nrow\n@@xffl end 0\n"
    )
    assert out.tz is None
    squeue = out.section("squeue")
    assert squeue.text == "slurm_load_jobs error" and squeue.rc is None  # read as a failed query
    assert out.section("sacct\u2028x", "y").text == "row"  # split on spaces, not at U+2028
    assert [m.kind for m in out.malformed] == ["marker"] * 4
    assert [m.line for m in out.malformed] == [
        "@@xffl tz 0100", "@@xffl begin", "@@xffl end 0", "@@xffl end one"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [b"@@xffl \n", b"@@xffl log\n", b"@@xffl log k 1 1 1", b"\xff@@xffl log \xff 1 1 1\n\xff",
     "@@xffl log k 1 1 1\n\u00e9\n", b"@@xffl end\n@@xffl begin a b c d\n"],
)  # fmt: skip
def test_parsing_never_raises(data):
    parse_sections(data)


def test_squeue_rows_are_split_on_newline_only():
    # a log path holding \x1c (which splitlines() would cut the row at) stays in its field
    text = row("5", "5", "RUNNING", "None", "0", "2026-11-25T20:21:22", "2026-11-25T20:21:22", "N/A",
               "exp", "wrap", "/home/u/odd\x1cname.out", "(null)")  # fmt: skip
    (job,) = parse_squeue(text + "\n")
    assert job.job_id == "5" and job.stdout == "/home/u/odd\x1cname.out"
    assert [j.job_id for j in parse_sacct(SACCT.replace("xffl.train", "x\u2028train"))][:1] == [
        "4242"
    ]


def test_a_short_row_costs_one_row_when_malformed_lines_are_collected():
    short = row("3", "3", "RUNNING")
    out = parse_sections(section_output("squeue", SQUEUE + "\n" + short, 0))
    assert squeue_answer(out.section("squeue")) is None  # strict: the whole answer is unread
    malformed: list[Malformed] = []
    assert len(squeue_answer(out.section("squeue"), malformed=malformed)) == 7
    assert malformed == [Malformed("squeue", "3\x1f3\x1fRUNNING\x1f")]
    sacct = parse_sections(section_output("sacct", "4242\x1fgarbage\n" + SACCT, 0))
    assert sacct_answer(sacct.section("sacct")) is None
    assert len(sacct_answer(sacct.section("sacct"), malformed=malformed)) == 7
    assert malformed[1:] == [Malformed("sacct", "4242\x1fgarbage")]
