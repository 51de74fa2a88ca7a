"""SbatchOptions (typed, validated, from a plain dict) and the batch script (golden file).

Pure functions only: nothing is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from xffl_airflow.slurm import SbatchOptions, SlurmInputError, command_text, render_batch_script

GOLDEN = Path(__file__).parent / "golden" / "batch_script.sh"

FULL = {
    "partition": "boost_usr_prod",
    "account": "EUHPC_A02_031",
    "qos": "normal",
    "nodes": 2,
    "ntasks_per_node": 4,
    "cpus_per_task": "8",
    "gpus_per_node": "a100:4",
    "mem": "480G",
    "time": "1-12:00:00",
    "extra": ["--exclusive", "--constraint=gpu"],
    "preamble": ["module load python/3.11", "source $HOME/venvs/xffl/bin/activate"],
}


def test_options_from_a_plain_dict_are_typed_and_normalised():
    options = SbatchOptions.from_dict(FULL)
    assert options.nodes == "2" and options.ntasks_per_node == 4 and options.cpus_per_task == 8
    assert options.extra == ("--exclusive", "--constraint=gpu")
    assert options.sbatch_options() == [
        "--partition=boost_usr_prod",
        "--account=EUHPC_A02_031",
        "--qos=normal",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--gpus-per-node=a100:4",
        "--mem=480G",
        "--time=1-12:00:00",
        "--exclusive",
        "--constraint=gpu",
    ]
    assert SbatchOptions.from_dict(options.to_dict()) == options


def test_time_accepts_slurm_formats_and_whole_minutes():
    for text in ("30", "0:01", "2:00:00", "1-12", "1-12:30", "1-12:30:00", "UNLIMITED"):
        assert SbatchOptions(time=text).time == text
    assert SbatchOptions(time=90).time == "90"


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"partition": "x; touch /tmp/pwned"}, "sbatch.partition", "not a valid name"),
        ({"account": "a b"}, "sbatch.account", "not a valid name"),
        ({"nodes": "two"}, "sbatch.nodes", "node count"),
        ({"nodes": 0}, "sbatch.nodes", "node count"),
        ({"ntasks_per_node": 0}, "sbatch.ntasks_per_node", "at least 1"),
        ({"cpus_per_task": "eight"}, "sbatch.cpus_per_task", "whole number"),
        ({"cpus_per_task": True}, "sbatch.cpus_per_task", "whole number"),
        ({"gpus_per_node": "a100:four"}, "sbatch.gpus_per_node", "GPU count"),
        ({"mem": "lots"}, "sbatch.mem", "memory size"),
        ({"time": "1 day"}, "sbatch.time", "time limit"),
        ({"time": "$(reboot)"}, "sbatch.time", "time limit"),
        ({"extra": "--exclusive"}, "sbatch.extra", "list of strings"),
        ({"extra": ["--comment=$(id)"]}, "sbatch.extra[0]", "not an sbatch option"),
        ({"extra": ["--exclusive", "-N 2"]}, "sbatch.extra[1]", "not an sbatch option"),
        ({"extra": ["--output=/tmp/x"]}, "sbatch.extra[0]", "set by the operator"),
        ({"extra": ["--array=1-3"]}, "sbatch.extra[0]", "set by the operator"),
        ({"preamble": ["module load a\nrm -rf ~"]}, "sbatch.preamble[0]", "single line"),
        ({"gpus": 4}, "sbatch.gpus", "unknown sbatch setting"),
    ],
)
def test_bad_options_name_the_field(data, field, words):
    with pytest.raises(SlurmInputError) as caught:
        SbatchOptions.from_dict(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and words in str(caught.value)


def test_options_must_be_a_mapping():
    with pytest.raises(SlurmInputError, match=r"^sbatch: must be a mapping"):
        SbatchOptions.from_dict(["partition", "debug"])


def render(**overrides):
    arguments = {
        "command": "python -m xffl_tasks.train --config round-3/train.yaml",
        "job_name": "xffl_federation.train_site1",
        "comment": "xffl/xffl_federation/manual__2026-01-01T00:00:00+00:00/train_site1/-1",
        "workdir": "/scratch/alice/xffl/round-3",
        "output": "/scratch/alice/xffl/round-3/xffl_federation.train_site1-%j.log",
        "env": {"XFFL_ROUND": "3", "HF_HOME": "/scratch/alice/hf cache", "NOTE": "it's $HOME `x`"},
    }
    arguments.update(overrides)
    return render_batch_script(SbatchOptions.from_dict(FULL), **arguments)


def test_batch_script_matches_the_golden_file():
    assert render() == GOLDEN.read_text()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"job_name": "x; touch /tmp/pwned"}, "job_name"),
        ({"job_name": "a b"}, "job_name"),
        ({"workdir": "/scratch/$(id)"}, "workdir"),
        ({"workdir": "/scratch/a b"}, "workdir"),
        ({"output": "/tmp/x;rm"}, "output"),
        ({"comment": "xffl/a b"}, "comment"),
        ({"env": {"BAD-NAME": "1"}}, "env"),
        ({"env": {"OK": "a\x00b"}}, "env.OK"),
        ({"command": "   "}, "command"),
    ],
)
def test_unsafe_script_values_are_refused(override, field):
    with pytest.raises(SlurmInputError) as caught:
        render(**override)
    assert caught.value.field == field


def test_command_lists_are_quoted_word_by_word():
    assert (
        command_text(["python", "-m", "train", "--config", "a b/c;d.yaml"])
        == "python -m train --config 'a b/c;d.yaml'"
    )
    assert command_text("echo $HOME") == "echo $HOME"
    with pytest.raises(SlurmInputError, match="command"):
        command_text([])
