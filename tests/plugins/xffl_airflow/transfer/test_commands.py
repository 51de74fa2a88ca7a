"""Remote commands of a transfer: built and parsed by pure functions, checked on literal text.

The command lines themselves are also run here, locally through ``sh -c`` on real files: the
same text the facility's shell gets, against the same coreutils, OpenSSL and python3.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from xffl_airflow.transfer import commands
from xffl_airflow.transfer.commands import HashTools

H1 = "a50ed80a2c62c3252bcc84f4abaa25d7cde697b512e8d5196280c68103ab586e"
H2 = "3ddf252a78b019ea3c0a34b147f1a4928cba058ed9471252e597e7c69a445b2b"
OPENSSL = HashTools(openssl=True, python3=True)
COREUTILS = HashTools()
# openssl comes with Debian's ca-certificates; where it is missing, facilities use sha256sum
HERE = [pytest.param(OPENSSL, id="openssl", marks=pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl here")),
        pytest.param(COREUTILS, id="sha256sum")]  # fmt: skip


def sh(command: str, stdin: str = "") -> str:
    return subprocess.run(
        ["sh", "-c", command], input=stdin, capture_output=True, text=True, check=True
    ).stdout


def test_hash_commands_quote_the_path():
    path = "/w/it's a model/x y.bin"
    assert (
        commands.build_sha256(OPENSSL, path)
        == "openssl dgst -sha256 -r '/w/it'\"'\"'s a model/x y.bin'"
    )
    assert commands.build_sha256(COREUTILS, path) == "sha256sum -- '/w/it'\"'\"'s a model/x y.bin'"


@pytest.mark.parametrize(
    "output",
    [f"{H1} */w/m/model.bin\n", f"{H1}  /w/m/model.bin\n"],
    ids=["openssl", "sha256sum"],
)
def test_both_hash_outputs_parse(output):
    assert commands.parse_sha256(output, "/w/m/model.bin") == H1


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("", "printed 0 lines"),
        (f"{H1}  /w/m/other.bin\n", "unexpected hash output"),
        (f"{H1[:-1]}  /w/m/model.bin\n", "unexpected hash output"),
        (f"{H1}  /w/m/model.bin\n{H2}  /w/m/model.bin\n", "printed 2 lines"),
    ],
)
def test_unexpected_hash_output_is_an_error(output, message):
    with pytest.raises(ValueError, match=message):
        commands.parse_sha256(output, "/w/m/model.bin")


@pytest.mark.parametrize("tools", HERE)
def test_the_hash_command_hashes_a_real_file(tmp_path, tools):
    path = tmp_path / "it's here.bin"
    path.write_bytes(b"x" * 100_000)
    output = sh(commands.build_sha256(tools, str(path)))
    assert commands.parse_sha256(output, str(path)) == hashlib.sha256(b"x" * 100_000).hexdigest()


def test_segment_command_and_parse():
    assert (
        commands.build_segment_hashes(OPENSSL, "/w/a b", 100, 30)
        == "head -c 100 -- '/w/a b' | split -b 30 --filter='openssl dgst -sha256 -r'"
    )
    assert commands.parse_segment_hashes(f"{H1} *stdin\n{H2} *stdin\n", 50, 30) == [H1, H2]
    assert commands.parse_segment_hashes(f"{H1}  -\n", 30, 30) == [H1]
    with pytest.raises(ValueError, match="got 1 segment hashes for 61 bytes, expected 3"):
        commands.parse_segment_hashes(f"{H1}  -\n", 61, 30)
    with pytest.raises(ValueError, match="unexpected segment hash line"):
        commands.parse_segment_hashes("head: cannot open\n", 30, 30)


@pytest.mark.parametrize("tools", HERE)
def test_segment_hashes_of_a_real_prefix(tmp_path, tools):
    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "part"
    path.write_bytes(data)
    output = sh(commands.build_segment_hashes(tools, str(path), 9000, 4096))
    expected = [
        hashlib.sha256(data[i : min(i + 4096, 9000)]).hexdigest() for i in range(0, 9000, 4096)
    ]
    assert commands.parse_segment_hashes(output, 9000, 4096) == expected


def test_matching_segments_stops_at_the_first_difference():
    assert commands.matching_segments(["a", "b", "c"], ["a", "b", "c"]) == 3
    assert commands.matching_segments(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert commands.matching_segments(["a", "b"], ["a"]) == 1
    assert commands.matching_segments([], ["a"]) == 0


def test_the_probe_reads_what_answered():
    empty = commands.EMPTY_SHA256
    assert commands.parse_probe(f"{empty} */dev/null\n{commands.PYTHON_OK}\n") == HashTools(
        True, True
    )
    assert commands.parse_probe(f"{commands.PYTHON_OK}\n") == HashTools(False, True)
    assert commands.parse_probe(f"{empty} */dev/null\n") == HashTools(True, False)
    assert commands.parse_probe("openssl: command not found\n") == HashTools(False, False)


def test_the_probe_runs_here():
    expected = HashTools(openssl=shutil.which("openssl") is not None, python3=True)
    assert commands.parse_probe(sh(commands.PROBE)) == expected


def test_the_growing_hasher_follows_a_file_as_it_grows(tmp_path):
    path = tmp_path / "growing part"
    data = b"0123456789" * 100_000
    path.write_bytes(data)
    # offsets as the sender settles them, then the final size
    output = sh(
        commands.build_growing_hash(str(path)), stdin="0\n300000\n300000\n999999\n1000000\n"
    )
    assert (
        commands.parse_growing_hash(output, 1_000_000, str(path))
        == hashlib.sha256(data).hexdigest()
    )


def test_the_growing_hasher_says_when_the_file_is_short(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    output = sh(commands.build_growing_hash(str(path)), stdin="10\n")
    assert output.split()[1] == "3"
    with pytest.raises(ValueError, match="read 3 bytes, expected 10"):
        commands.parse_growing_hash(output, 10, str(path))


def test_the_growing_hasher_command_has_nothing_for_a_shell_to_mangle():
    command = commands.build_growing_hash("/w/m/.model.bin.xffl-part")
    script = command.split("'")[1]
    assert "\n" not in command and "!" not in command and "$" not in command
    assert script.startswith("import base64; exec(base64.b64decode(")


# Names the facility could not print back on one line never reach a command (remote_text).
ODD = "/w/m/model\u2028x.bin"


@pytest.mark.parametrize(
    "build",
    [
        lambda: commands.build_sha256(OPENSSL, ODD),
        lambda: commands.build_sha256(COREUTILS, ODD),
        lambda: commands.build_segment_hashes(OPENSSL, ODD, 100, 30),
        lambda: commands.build_growing_hash(ODD),
    ],
    ids=["openssl", "sha256sum", "segments", "growing"],
)
def test_commands_refuse_a_path_with_a_line_break(build):
    with pytest.raises(
        ValueError, match=r"^remote path '/w/m/model\\u2028x\.bin' holds U\+2028 \(LINE SEPARATOR\)"
    ):
        build()


def test_a_hash_line_is_split_on_newline_only():
    # splitlines() would drop the U+2028 and read the name as /w/m/model.bin
    with pytest.raises(ValueError, match=r"unexpected hash output for '/w/m/model.bin'"):
        commands.parse_sha256(f"{H1}  /w/m/model.bin\u2028", "/w/m/model.bin")
    # and would read one line holding \x1c as two segments
    with pytest.raises(ValueError, match="unexpected segment hash line"):
        commands.parse_segment_hashes(f"{H1} *stdin\x1c{H2} *stdin\n", 60, 30)
    # a marker glued to other output by \x85 is not a line of its own
    noise = f"{commands.EMPTY_SHA256} */dev/null\nnoise\x85{commands.PYTHON_OK}\n"
    assert commands.parse_probe(noise) == HashTools(openssl=True, python3=False)
