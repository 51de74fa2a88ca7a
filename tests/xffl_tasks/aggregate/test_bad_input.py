"""Bad input to ``python -m xffl_tasks.aggregate``: one clear line, non-zero exit, nothing at OUT_DIR.

One test per case of the issue, on copies of the session's real checkpoints (conftest), each
broken in one way. Most call the CLI's ``main`` in this process; the first two run it as a
real child process (``python -m xffl_tasks.aggregate``), which they wait for.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_tasks.aggregate.__main__ import main

REPO = Path(__file__).resolve().parents[3]
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def run_cli(family, out: Path, *extra: str) -> int:
    folders = [str(p) for p in family.clients.values()]
    return main(["--previous", str(family.base), "--out", str(out), *extra, *folders])


def assert_refused(rc: int, err: str, out: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("xffl-aggregate: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")] == []


def rewrite(path: Path, change) -> None:
    """Loads one safetensors file with the reference library, lets ``change`` edit it, saves it."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of(folder: Path, tensor: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][tensor]
    return folder / "model.safetensors"


@pytest.fixture
def out(tmp_path) -> Path:
    """OUT_DIR in a round's folder that exists (so leftovers beside it would show)."""
    (tmp_path / "round").mkdir()
    return tmp_path / "round" / "global"


def run_child_process(family, out: Path) -> subprocess.CompletedProcess:
    """``python -m xffl_tasks.aggregate`` on the family, as a real process."""
    command = [sys.executable, "-m", "xffl_tasks.aggregate", "--previous", str(family.base)]
    command += ["--out", str(out), *[str(p) for p in family.clients.values()]]
    return subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_a_tensor_the_previous_model_lacks_is_named_by_a_child_process(family_copy, out):
    """The tied-embeddings case: a client that saved lm_head.weight on its own."""
    rewrite(
        family_copy.clients["site2"] / "model.safetensors",
        lambda t: t.update({"lm_head.weight": t[EMBED].clone()}),
    )
    result = run_child_process(family_copy, out)
    words = ["client 'site2'", "'lm_head.weight'", "not in the previous"]
    assert_refused(result.returncode, result.stderr, out, *words)
    assert result.stdout == ""


def test_a_tensor_the_client_lacks_is_named_by_a_child_process(family_copy, out):
    rewrite(family_copy.clients["site2"] / "model.safetensors", lambda t: t.pop(NORM))
    result = run_child_process(family_copy, out)
    assert_refused(
        result.returncode, result.stderr, out, "client 'site2'", f"lacks tensor '{NORM}'"
    )


def test_a_shape_mismatch_is_named(family_copy, out, capsys):
    rewrite(
        family_copy.clients["site2"] / "model.safetensors",
        lambda t: t.update({EMBED: t[EMBED].reshape(128, 128)}),
    )
    rc = run_cli(family_copy, out)
    assert_refused(
        rc, capsys.readouterr().err, out, "client 'site2'", f"'{EMBED}'", "[128, 128]", "[256, 64]"
    )


def test_a_dtype_mismatch_is_named(family_copy, out, capsys):
    rewrite(
        family_copy.clients["site2"] / "model.safetensors",
        lambda t: t.update({NORM: t[NORM].float()}),
    )
    rc = run_cli(family_copy, out)
    assert_refused(rc, capsys.readouterr().err, out, "client 'site2'", f"'{NORM}'", "F32", "BF16")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_a_client_is_named_with_the_element(family_copy, out, capsys, value):
    tensor = "model.layers.1.mlp.up_proj.weight"

    def poison(tensors):
        if tensor in tensors:
            tensors[tensor][17, 5] = value

    rewrite(shard_of(family_copy.clients["site3"], tensor), poison)
    rc = run_cli(family_copy, out, "--names", "it,cz,de")
    assert_refused(
        rc, capsys.readouterr().err, out, "client 'de'", f"'{tensor}'", "[17, 5]", str(value)
    )


def test_a_truncated_file_is_named(family_copy, out, capsys):
    path = family_copy.clients["site2"] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    rc = run_cli(family_copy, out)
    assert_refused(
        rc,
        capsys.readouterr().err,
        out,
        "client 'site2'",
        "model.safetensors",
        "tensor '",
        "truncated",
    )


def test_a_header_length_past_the_end_of_the_file_is_named(family_copy, out, capsys):
    path = family_copy.clients["site1"] / "model-00002-of-00006.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 1) + data[8:])
    rc = run_cli(family_copy, out)
    assert_refused(
        rc,
        capsys.readouterr().err,
        out,
        "client 'site1'",
        "model-00002-of-00006.safetensors",
        "header length",
    )


def test_offsets_out_of_bounds_are_named(family_copy, out, capsys):
    path = family_copy.clients["site2"] / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    last = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    begin, end = header[last]["data_offsets"]
    header[last]["shape"] = [header[last]["shape"][0] * 2, *header[last]["shape"][1:]]
    header[last]["data_offsets"] = [begin, end + (end - begin)]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    rc = run_cli(family_copy, out)
    assert_refused(
        rc, capsys.readouterr().err, out, "client 'site2'", f"tensor '{last}'", "out of bounds"
    )


def test_a_pickle_checkpoint_is_refused_unopened(family_copy, out, capsys):
    client = family_copy.clients["site3"]
    torch.save({"marker": torch.zeros(1)}, client / "pytorch_model.bin")
    rc = run_cli(family_copy, out)
    assert_refused(
        rc, capsys.readouterr().err, out, "client 'site3'", "'pytorch_model.bin'", "pickle"
    )


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ("1,0,2", ["client 'site2'", "weight 0.0", "positive"]),
        ("1,-3,2", ["client 'site2'", "weight -3.0", "positive"]),
        ("1,2,many", ["--weights", "value 3", "'many'", "not a number"]),
        ("1,2,nan", ["client 'site3'", "positive finite"]),
        ("1,2", ["weights", "2 weights for 3 clients"]),
    ],
)
def test_bad_weights_are_named(family, out, capsys, weights, words):
    rc = run_cli(family, out, "--weights", weights)
    assert_refused(rc, capsys.readouterr().err, out, *words)


@pytest.mark.parametrize(
    ("samples", "words"),
    [
        (samples, ["is not a whole number from 1 to 1000000000000"])
        for samples in (0, -5, "12", 2.5, 10**13, True)
    ],
)
def test_bad_num_samples_are_named(family_copy, out, capsys, samples, words):
    (family_copy.clients["site1"] / "metrics.json").write_text(
        json.dumps({"num_samples": samples, "num_tokens": 1})
    )
    rc = run_cli(family_copy, out)
    assert_refused(rc, capsys.readouterr().err, out, "client 'site1'", "num_samples", *words)


def test_no_metrics_and_no_weights_is_an_error_not_equal_weights(family_copy, out, capsys):
    (family_copy.clients["site3"] / "metrics.json").unlink()
    rc = run_cli(family_copy, out)
    assert_refused(rc, capsys.readouterr().err, out, "client 'site3'", "metrics.json", "--weights")


def test_an_existing_out_dir_is_left_alone(family, tmp_path, capsys):
    out = tmp_path / "global"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = run_cli(family, out)
    err = capsys.readouterr().err
    assert (
        rc != 0
        and len(err.strip().splitlines()) == 1
        and "already exists" in err
        and str(out) in err
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (
        out / "keep.txt"
    ).read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["global"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--strategy", "fedsgd"], ["strategy 'fedsgd'", "fedavg"]),
        (["--strategy", "fedadam", "--option", "beta1=1.5"], ["'beta1'", "[0, 1)", "1.5"]),
        (["--strategy", "fedadam", "--option", "lr=0.1"], ["'lr'", "server_learning_rate"]),
        (
            ["--strategy", "fedavgm", "--option", "momentum=fast"],
            ["'momentum'", "'fast'", "not a number"],
        ),
        (
            ["--strategy", "trimmed-mean", "--option", "trim_fraction=0.4"],
            ["'trim_fraction'", "2 of 3"],
        ),
        (["--names", "a,a,b"], ["'a'", "twice"]),
    ],
)
def test_bad_strategy_options_and_names_are_named(family, out, capsys, extra, words):
    rc = run_cli(family, out, *extra)
    assert_refused(rc, capsys.readouterr().err, out, *words)
