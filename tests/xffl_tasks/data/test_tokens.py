"""Token streams, sequences, splits and the pre-tokenised folder, with a small BPE tokenizer
trained in the test. Starts nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xffl_tasks.data.corpus import DataError
from xffl_tasks.data.dataset import load_dataset
from xffl_tasks.data.pretokenize import main as pretokenize_main
from xffl_tasks.data.tokens import (
    Sequences,
    read_pretokenised,
    split_documents,
    tokenize_documents,
    tokenizer_fingerprint,
)
from xffl_tasks.tiny.model import train_tokenizer

TEXTS = [f"Oggi è giorno {i}, domani sarà giorno {i + 1}." for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, max_length=64)


def test_stream_wraps_documents_in_bos_and_eos(tokenizer):
    stream = tokenize_documents(["ciao", "mondo"], tokenizer)
    ids = tokenizer(["ciao", "mondo"], add_special_tokens=False)["input_ids"]
    assert stream.tolist() == [1, *ids[0], 2, 1, *ids[1], 2]


def test_sequences_cut_and_drop_the_tail():
    sequences = Sequences.from_stream(np.arange(10), 3)
    assert len(sequences) == 3
    assert sequences.batch(np.array([2, 0])).tolist() == [[6, 7, 8], [0, 1, 2]]
    assert len(sequences.limit(2)) == 2


def test_sequence_split_is_fixed_and_disjoint():
    train, validation = Sequences.from_stream(np.arange(100), 5).split(0.1)
    assert (len(train), len(validation)) == (18, 2)
    assert not set(train.index.tolist()) & set(validation.index.tolist())
    again = Sequences.from_stream(np.arange(100), 5).split(0.1)[1]
    assert validation.index.tolist() == again.index.tolist()


def test_document_split():
    documents = [str(i) for i in range(20)]
    train, validation = split_documents(documents, 0.1)
    assert len(validation) == 2 and len(train) == 18
    assert sorted(train + validation, key=int) == documents
    assert split_documents(documents, 0.1) == (train, validation)
    with pytest.raises(DataError, match="only 1 document"):
        split_documents(["x"], 0.1)


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_dataset_from_folder_with_validation_file(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", TEXTS[:150])
    write_jsonl(tmp_path / "validation.jsonl", TEXTS[150:])
    dataset = load_dataset(tmp_path, tokenizer=tokenizer, seq_len=16)
    assert dataset.description["validation_files"] == [str(tmp_path / "validation.jsonl")]
    assert len(dataset.train) == len(tokenize_documents(TEXTS[:150], tokenizer)) // 16
    assert (
        len(load_dataset(tmp_path, tokenizer=tokenizer, seq_len=16, val_max_sequences=3).validation)
        == 3
    )


def test_dataset_split_when_no_validation_file(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", TEXTS)
    dataset = load_dataset(tmp_path, tokenizer=tokenizer, seq_len=16, val_split=0.2)
    assert 0 < len(dataset.validation) < len(dataset.train)


def test_sequence_longer_than_the_data(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", TEXTS[:3])
    write_jsonl(tmp_path / "validation.jsonl", TEXTS[3:5])
    with pytest.raises(DataError, match=r"training tokens, fewer than one sequence of seq_len 64"):
        load_dataset(tmp_path, tokenizer=tokenizer, seq_len=64)


def test_pretokenised_round_trip(tmp_path, tokenizer):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    write_jsonl(tmp_path / "raw" / "train.jsonl", TEXTS[:150])
    write_jsonl(tmp_path / "raw" / "validation.jsonl", TEXTS[150:])
    out = tmp_path / "tokens"
    assert (
        pretokenize_main(
            ["--model", str(model), "--data", str(tmp_path / "raw"), "--out", str(out)]
        )
        == 0
    )
    meta = json.loads((out / "xffl_tokens.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["documents"] == 150
    streams = read_pretokenised(
        out, fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer)
    )
    assert streams["train"].tolist() == tokenize_documents(TEXTS[:150], tokenizer).tolist()
    from_tokens = load_dataset(out, tokenizer=tokenizer, seq_len=16)
    from_text = load_dataset(tmp_path / "raw", tokenizer=tokenizer, seq_len=16)
    assert from_tokens.description["kind"] == "pre-tokenised"
    assert (
        from_tokens.train.batch(np.arange(5)).tolist()
        == from_text.train.batch(np.arange(5)).tolist()
    )
    assert len(from_tokens.validation) == len(from_text.validation)
    # a second run refuses to overwrite
    assert (
        pretokenize_main(
            ["--model", str(model), "--data", str(tmp_path / "raw"), "--out", str(out)]
        )
        == 2
    )


def test_pretokenised_checks(tmp_path, tokenizer):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    write_jsonl(tmp_path / "raw" / "train.jsonl", TEXTS)
    out = tmp_path / "tokens"
    pretokenize_main(["--model", str(model), "--data", str(tmp_path / "raw"), "--out", str(out)])
    other = train_tokenizer(TEXTS[:50], vocab_size=280, max_length=64)
    with pytest.raises(DataError, match="tokenised with another tokenizer"):
        read_pretokenised(out, fingerprint=tokenizer_fingerprint(other), vocab_size=len(other))
    with (out / "train.bin").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="truncated or changed"):
        read_pretokenised(
            out, fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer)
        )


def test_fingerprint_survives_save_and_reload(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
