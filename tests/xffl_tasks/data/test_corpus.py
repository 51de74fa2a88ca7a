"""Data paths: which files train and validate, and how bad data is reported. Starts nothing."""

from __future__ import annotations

import json

import pytest

from xffl_tasks.data.corpus import DataError, discover, read_all, read_documents


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_roles(tmp_path):
    for name in ("train.jsonl", "part-2.txt", "validation.jsonl", "val_extra.txt", "dev.ndjson", "test.jsonl",
                 "notes.md", ".hidden.jsonl", "sub/more.jsonl"):  # fmt: skip
        write(tmp_path / name, "")
    source = discover(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in source.train_files] == [
        "part-2.txt",
        "sub/more.jsonl",
        "train.jsonl",
    ]
    assert [p.name for p in source.validation_files] == [
        "dev.ndjson",
        "val_extra.txt",
        "validation.jsonl",
    ]
    assert source.pretokenised is None


def test_single_file_and_explicit_validation_file(tmp_path):
    train = write(tmp_path / "corpus.jsonl", "")
    val = write(tmp_path / "held.txt", "")
    source = discover(train, val_file=val)
    assert (source.train_files, source.validation_files) == ([train], [val])


def test_pretokenised_folder_is_recognised(tmp_path):
    write(tmp_path / "xffl_tokens.json", "{}")
    assert discover(tmp_path).pretokenised == tmp_path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "no such data file or folder"),
        (lambda p: write(p / "data.csv", "a,b"), "unsupported data file"),
        (lambda p: write(p / "d" / "validation.jsonl", "").parent, "no training files"),
    ],
)
def test_bad_paths(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        discover(setup(tmp_path))


def test_missing_validation_file(tmp_path):
    write(tmp_path / "train.jsonl", "")
    with pytest.raises(DataError, match="no such validation file"):
        discover(tmp_path, val_file=tmp_path / "nope.jsonl")


def test_jsonl_and_text_documents(tmp_path):
    jsonl = write(
        tmp_path / "a.jsonl",
        "\n".join(
            json.dumps(r) for r in [{"text": "uno"}, {"text": "  "}, {"body": "x", "text": "due"}]
        )
        + "\n\n",
    )
    assert list(read_documents(jsonl)) == ["uno", "due"]
    text = write(tmp_path / "b.txt", "first line\nsame document\n\n\nsecond\n")
    assert list(read_documents(text)) == ["first line\nsame document", "second"]
    custom = write(tmp_path / "c.jsonl", json.dumps({"body": "tre"}) + "\n")
    assert list(read_documents(custom, text_field="body")) == ["tre"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{broken\n', r"a.jsonl:2: not valid JSON"),
        ('["text"]\n', r"a.jsonl:1: expected a JSON object"),
        ('{"body": "x"}\n', r"a.jsonl:1: no 'text' field"),
        ('{"text": 3}\n', r"a.jsonl:1: the 'text' field is not a string"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "a.jsonl", content)
    with pytest.raises(DataError, match=message):
        list(read_documents(path))


def test_binary_file_is_unreadable(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"train.jsonl: not UTF-8 text \(bad byte at offset 0\)"):
        list(read_documents(path))


def test_empty_data_is_an_error(tmp_path):
    paths = [write(tmp_path / "a.jsonl", ""), write(tmp_path / "b.jsonl", '{"text": ""}\n')]
    with pytest.raises(DataError, match="no training text"):
        read_all(paths, text_field="text", what="training")
