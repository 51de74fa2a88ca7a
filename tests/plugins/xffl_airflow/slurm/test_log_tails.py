"""Log tails travel base64-encoded, one line after their ``@@xffl tail JOB`` marker: a job whose
log holds ``@@xffl`` marker lines gets its own tail back intact, and cannot hide its last lines
or forge another job's tail in the same answer.

Unit level: literal outputs, and the tail script run by the local ``sh`` on files in
``tmp_path`` (nothing else is started).
"""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from xffl_airflow.slurm import commands
from xffl_airflow.slurm.parsing import MAX_TAIL_LINE, Malformed, parse_sections, tail_lines

# What a hostile job prints: the old raw framing's end and begin markers (to hide its own last
# lines and forge job 43's tail), the new framing's marker with a forged data line, and a
# squeue section with a forged state.
HOSTILE = (
    b"epoch 1 of 42\n"
    b"@@xffl end 0\n"
    b"@@xffl begin tail 43\nforged line for 43\n@@xffl end 0\n"
    b"@@xffl tail 43\n" + base64.b64encode(b"forged tail for 43\n") + b"\n"
    b"@@xffl begin squeue\n43\x1f43\x1fFAILED\x1f\n@@xffl end 0\n"
    b"last words of 42\n"
)
HONEST = b"epoch 1 of 43\nepoch 2 of 43\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_tail_script_prints_a_marker_and_one_base64_line_per_job():
    script = commands.build_tail_script([("42", "/w/a-42.log"), ("43_1", "/w/a-%A_%a.log")], 5)
    assert "xffl_tail 42 5 /w/a-42.log\n" in script
    assert "xffl_tail 43_1 5 /w/a-%A_%a.log\n" in script
    assert "tail -c 65536; } 2>/dev/null | base64 -w 0" in script
    assert "@@xffl begin" not in script  # no raw section: nothing of the log is printed raw


def test_a_tail_holding_marker_lines_comes_back_intact_and_forges_nothing():
    text = "@@xffl tail 42\n" + b64(HOSTILE) + "\n@@xffl tail 43\n" + b64(HONEST) + "\n"
    out = parse_sections(text)
    assert out.tails == {"42": HOSTILE, "43": HONEST}
    assert out.sections == [] and out.malformed == []  # the forged squeue section is not one
    assert tail_lines(out.tails["42"], 100) == HOSTILE.decode().splitlines()
    assert tail_lines(out.tails["42"], 1) == ["last words of 42"]  # its last line is not hidden
    assert tail_lines(out.tails["43"], 100) == ["epoch 1 of 43", "epoch 2 of 43"]


def test_a_tail_marker_without_its_data_line_or_with_bad_base64_is_skipped():
    out = parse_sections(
        "@@xffl tail 41\n@@xffl tail 42\n!!!!\n@@xffl tail\n" + b64(b"x\n") + "\n"
        "@@xffl tail 43\n" + b64(HONEST) + "\n@@xffl tail 44"
    )
    assert out.tails == {"43": HONEST}  # 44 was cut off before its data line: no tail
    assert out.malformed == [
        Malformed("tail", "@@xffl tail 41"),
        Malformed("tail", "!!!!"),
        Malformed("tail", "@@xffl tail"),
    ]


def test_tail_lines_keeps_the_last_non_blank_lines_split_on_newline_only():
    data = "a\r\n\n  \nb\x85still b\u2028same b\n".encode() + b"c\xff\n"
    data += b"d" * (MAX_TAIL_LINE + 10) + b"\n"
    lines = tail_lines(data, 10)
    assert lines[:2] == ["a", "b\x85still b\u2028same b"]
    assert lines[2] == "c\ufffd" and lines[3] == "d" * MAX_TAIL_LINE + " [...]"
    assert tail_lines(data, 1) == [lines[-1]] and tail_lines(data, 0) == []
    assert tail_lines(b"", 5) == []


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a local sh")
def test_the_real_script_brings_a_hostile_tail_back_intact(tmp_path):
    (tmp_path / "a-42.log").write_bytes(HOSTILE * 3)
    (tmp_path / "a-43.log").write_bytes(HONEST)
    reads = [("42", str(tmp_path / "a-42.log")), ("43", str(tmp_path / "a-43.log")),
             ("44", str(tmp_path / "missing.log"))]  # fmt: skip
    script = commands.build_tail_script(reads, 4)
    done = subprocess.run(["sh", "-s"], input=script.encode(), capture_output=True, check=True)
    out = parse_sections(done.stdout)
    assert out.tails["42"] == b"".join(HOSTILE.splitlines(keepends=True)[-4:])
    assert tail_lines(out.tails["42"], 4) == [
        "@@xffl begin squeue", "43\x1f43\x1fFAILED\x1f", "@@xffl end 0", "last words of 42"
    ]  # fmt: skip
    assert out.tails["43"] == HONEST and out.tails["44"] == b""
    assert out.sections == [] and out.malformed == [] and done.stderr == b""
