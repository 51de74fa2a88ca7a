"""Shell text built for the facilities (validated and quoted), the task tag, the job report.

Pure functions only: nothing is started (the scripts are checked with ``sh -n``).
"""

from __future__ import annotations

import subprocess

import pytest
from xffl_airflow.slurm import commands
from xffl_airflow.slurm.commands import LogRead
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.report import REPORT_KEYS, iso_time, job_report
from xffl_airflow.slurm.states import SlurmJob
from xffl_airflow.slurm.tags import TaskTag, default_job_name


def sh_syntax_ok(script: str) -> bool:
    return (
        subprocess.run(
            ["sh", "-n"], check=False, input=script, text=True, capture_output=True
        ).returncode
        == 0
    )


def test_squeue_command_quotes_the_format_and_lists_jobs():
    command = commands.build_squeue_command(["12", "13_2", "12"])
    assert command.startswith("squeue -h -t all -j12,13_2 -O 'JobArrayID:\x1f,JobID:\x1f,")
    assert command.endswith("Comment:\x1f'")


def test_poll_script_reads_logs_after_squeue():
    script = commands.build_poll_script(
        ["12", "13"], [LogRead("w1", "/scratch/a b/x.log".replace(" ", "_"), 10, 4096)]
    )
    assert script.index("squeue") < script.index("xffl_log w1 /scratch/a_b/x.log 10 4096")
    assert script.startswith("printf '@@xffl tz %s\\n' \"$(date +%z)\"")
    assert sh_syntax_ok(script)
    assert "squeue" not in commands.build_poll_script([], [LogRead("w1", "/x.log")])


def test_resolve_script_falls_back_to_sacct_c_only_when_sacct_fails():
    script = commands.build_resolve_script(["12", "13"])
    assert "sacct -X -n -P" in script and "-j 12,13" in script
    assert (
        "if [ \"$xffl_rc\" -ne 0 ]; then\nprintf '@@xffl begin %s\\n' sacct-c\nsacct -c" in script
    )
    assert "scontrol show -o job 12" in script and "scontrol show -o job 13" in script
    assert sh_syntax_ok(script)


def test_submit_writes_aside_then_renames():
    command = commands.build_submit_command("/scratch/alice/round-1", "site1.train.sbatch")
    assert command == (
        "mkdir -p -- /scratch/alice/round-1 && xffl_tmp=$(mktemp -- /scratch/alice/round-1/.site1.train.sbatch.XXXXXX)"
        ' && cat > "$xffl_tmp" && mv -f -- "$xffl_tmp" /scratch/alice/round-1/site1.train.sbatch'
        " && sbatch --parsable -- /scratch/alice/round-1/site1.train.sbatch"
    )
    with pytest.raises(SlurmInputError, match="must be absolute"):
        commands.build_submit_command("relative/dir", "x.sbatch")


@pytest.mark.parametrize(
    "build",
    [
        lambda: commands.build_squeue_command(["1; touch /tmp/pwned"]),
        lambda: commands.build_squeue_command([]),
        lambda: commands.build_cancel_command("1 2"),
        lambda: commands.build_cancel_command("$(id)"),
        lambda: commands.build_workdir_command("x; touch /tmp/pwned"),
        lambda: commands.build_workdir_command("-rf"),
        lambda: commands.build_find_script("x; touch /tmp/pwned"),
        lambda: commands.build_poll_script(["1"], [LogRead("w1", "/x`id`.log")]),
        lambda: commands.build_poll_script(["1"], [LogRead("w 1", "/x.log")]),
        lambda: commands.build_poll_script(["1"], [LogRead("w1", "/x.log", -1)]),
        lambda: commands.build_tail_script([("1", "/x.log")], 0),
        lambda: commands.build_submit_command("/w", "x;y"),
    ],
)
def test_unsafe_values_never_reach_a_shell(build):
    with pytest.raises(SlurmInputError):
        build()


def test_workdir_find_cancel_and_tail_commands():
    assert (
        commands.build_workdir_command("xffl/round-1")
        == "mkdir -p -- xffl/round-1 && cd -- xffl/round-1 && pwd -P"
    )
    assert commands.build_cancel_command("4242") == "scancel 4242"
    find = commands.build_find_script("xffl.train")
    assert (
        "squeue -h -t all --me -n xffl.train" in find and "--name=xffl.train -S now-7days" in find
    )
    tail = commands.build_tail_script([("5", "/w/a-5.log")], 20)
    assert "xffl_tail 5 20 /w/a-5.log\n" in tail and sh_syntax_ok(tail)
    assert '{ tail -n "$2" -- "$3" | tail -c 65536; } 2>/dev/null | base64 -w 0' in tail


def test_task_tag_round_trips_and_refuses_unsafe_ids():
    tag = TaskTag("xffl_federation", "manual__2026-01-01T00:00:00+00:00", "train_site1", 2)
    assert tag.comment == "xffl/xffl_federation/manual__2026-01-01T00:00:00+00:00/train_site1/2"
    assert TaskTag.parse(tag.comment) == tag
    assert TaskTag.parse("something else") is None
    assert TaskTag.parse("xffl/a/b/c/notanint") is None
    with pytest.raises(SlurmInputError, match="run_id"):
        TaskTag("d", "run; rm -rf /", "t")
    with pytest.raises(SlurmInputError, match="dag_id"):
        TaskTag("dag/with/slash", "r", "t")


def test_default_job_name():
    assert default_job_name("xffl_federation", "train_site1") == "xffl_federation.train_site1"
    assert default_job_name("d", "t", 3) == "d.t.3"
    assert default_job_name("_d", "t") == "j_d.t"
    long = default_job_name("d" * 200, "t")
    assert len(long) == 128 and long != default_job_name("d" * 199 + "e", "t")


def test_report_times_carry_the_facility_offset_and_durations():
    job = SlurmJob("5", "FAILED", exit_code="3:0", reason="NonZeroExitCode", submit_time="2026-11-25T20:21:00",
                   start_time="2026-11-25T20:21:30", end_time="2026-11-25T20:22:40", cluster="site1")  # fmt: skip
    report = job_report(job, conn_id="facility_site1", log_path="/w/a-5.log", tz="+0100")
    assert tuple(report) == REPORT_KEYS
    assert report["submit_time"] == "2026-11-25T20:21:00+01:00"
    assert (report["queue_wait_s"], report["run_s"], report["elapsed_s"]) == (30.0, 70.0, 100.0)
    assert (report["state"], report["exit_code"], report["log_path"]) == (
        "FAILED",
        "3:0",
        "/w/a-5.log",
    )
    running = job_report(SlurmJob("6", "RUNNING", start_time="2026-11-25T20:21:30", end_time="2026-11-25T21:21:30"),
                         conn_id="c", log_path=None, tz=None)  # fmt: skip
    assert (
        running["end_time"] is None and running["run_s"] is None
    )  # a running job's EndTime is a forecast
    assert iso_time("garbage", "+0000") is None and iso_time(None, None) is None
