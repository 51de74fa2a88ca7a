"""Hashes given by the transfer (``input_hashes``, ``--input-hashes``): taken while each file
keeps the size and mtime recorded with its hash, so every input is read once; a file touched
since is hashed again, and the report says which hash came from where. Starts no process
(the CLI runs in-process)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.xffl_tasks.aggregate.conftest import load_tensors
from xffl_tasks.aggregate import AggregationError, aggregate
from xffl_tasks.aggregate.__main__ import main


def given_hashes(*folders) -> dict[str, dict]:
    """What the pull records for every file of ``folders``: sha256, size, mtime_ns."""
    given = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            stat = path.stat()
            given[str(path)] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
    return given


def test_given_hashes_are_taken_and_every_input_is_read_once(family, tmp_path):
    clients = list(family.clients.values())
    given = given_hashes(*clients)
    report = aggregate(family.base, clients, tmp_path / "given", input_hashes=given)
    hashed = aggregate(family.base, clients, tmp_path / "hashed")
    # the previous model's weights are read (and hashed) once, its small files copied; of the
    # clients only the weights are read, once, though two are sharded unlike the previous model
    previous = sum(p.stat().st_size for p in family.base.iterdir())
    weights = sum(p.stat().st_size for c in clients for p in c.glob("*.safetensors"))
    assert report["bytes_read"] == previous + weights
    assert hashed["bytes_read"] > report["bytes_read"]
    for entry, checked in zip(report["clients"], hashed["clients"]):
        assert entry["files"] == checked["files"]
        assert set(entry["hash_sources"].values()) == {"given"}
        assert entry["hash_sources"].keys() == entry["files"].keys()
    assert report["previous_files"] == hashed["previous_files"]
    assert set(report["previous_hash_sources"].values()) == {"computed"}
    files = sum(len(entry["files"]) for entry in report["clients"])
    assert report["input_hashes"] == {
        "given": files,
        "computed": len(report["previous_files"]),
        "stale": [],
    }
    assert report["output_files"] == hashed["output_files"]


def test_a_file_touched_after_its_hash_was_taken_is_hashed_again(family_copy, tmp_path):
    clients = list(family_copy.clients.values())
    given = given_hashes(*clients)
    trusted = clients[0] / "metrics.json"
    touched = next(iter(sorted(clients[1].glob("*.safetensors"))))
    # a given hash is taken on trust while size and mtime match: a wrong one shows it
    given[str(trusted)]["sha256"] = "0" * 64
    given[str(touched)]["sha256"] = "1" * 64
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    report = aggregate(family_copy.base, clients, tmp_path / "out", input_hashes=given)
    first, second = report["clients"][0], report["clients"][1]
    assert first["files"]["metrics.json"] == "0" * 64
    assert first["hash_sources"]["metrics.json"] == "given"
    real = hashlib.sha256(touched.read_bytes()).hexdigest()
    assert second["files"][touched.name] == real
    assert second["hash_sources"][touched.name] == "computed"
    assert report["input_hashes"]["stale"] == [str(touched)]


def test_hashes_of_a_rejected_client_are_not_needed(family_copy, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    clients = list(family_copy.clients.values())
    given = given_hashes(*clients)
    path = clients[1] / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    report = aggregate(
        family_copy.base, clients, tmp_path / "out", input_hashes=given, min_clients=2
    )
    assert list(report["rejected"]) == [clients[1].name]
    assert report["input_hashes"]["stale"] == []  # the restarted pass no longer reads it
    assert all(set(c["hash_sources"].values()) == {"given"} for c in report["clients"])
    assert torch.isfinite(load_tensors(tmp_path / "out")[name].float()).all()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"size": 1, "mtime_ns": 1}, "no 'sha256'"),
        ({"sha256": "AB" * 32, "size": 1, "mtime_ns": 1}, "not 64 lowercase hex digits"),
        ({"sha256": "ab" * 32, "size": -1, "mtime_ns": 1}, "size -1 is not a whole number"),
        ({"sha256": "ab" * 32, "size": 1, "mtime_ns": True}, "mtime_ns True is not"),
        ("ab" * 32, "not an object"),
    ],
)
def test_malformed_input_hashes_are_refused_by_name(family, tmp_path, entry, message):
    with pytest.raises(AggregationError, match=message):
        aggregate(
            family.base,
            list(family.clients.values()),
            tmp_path / "out",
            input_hashes={"site1/model.safetensors": entry},
        )
    assert not (tmp_path / "out").exists()


def test_cli_reads_input_hashes_with_paths_relative_to_the_file(family, tmp_path, capsys):
    clients = list(family.clients.values())
    given = {
        os.path.relpath(path, family.base.parent): entry
        for path, entry in given_hashes(*clients).items()
    }
    hashes = family.base.parent / "hashes.json"
    hashes.write_text(json.dumps(given))
    out = tmp_path / "out"
    argv = ["--previous", str(family.base), "--out", str(out), "--input-hashes", str(hashes)]
    assert main([*argv, *map(str, clients)]) == 0
    report = json.loads((out / "aggregation.json").read_text())
    assert report["input_hashes"]["given"] == len(given)
    hashes.write_text("{not json")
    assert (
        main(
            [
                "--previous",
                str(family.base),
                "--out",
                str(tmp_path / "o2"),
                "--input-hashes",
                str(hashes),
                *map(str, clients),
            ]
        )
        == 2
    )
    assert "--input-hashes" in capsys.readouterr().err
    hashes.unlink()
