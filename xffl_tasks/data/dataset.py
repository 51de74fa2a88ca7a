"""The training and validation sequences of a data path, ready for the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.data.corpus import DataError, discover, read_all
from xffl_tasks.data.tokens import (
    Sequences,
    read_pretokenised,
    split_documents,
    tokenize_documents,
    tokenizer_fingerprint,
)


@dataclass(frozen=True)
class Dataset:
    train: Sequences
    validation: Sequences
    description: dict[str, Any]


def _sequences(tokens, seq_len: int, *, what: str, where: str) -> Sequences:
    sequences = Sequences.from_stream(tokens, seq_len)
    if len(sequences) == 0:
        raise DataError(
            f"{where}: {len(tokens)} {what} tokens, fewer than one sequence of seq_len {seq_len}"
        )
    return sequences


def load_dataset(
    data: str | Path,
    *,
    tokenizer: Any,
    seq_len: int,
    text_field: str = "text",
    val_file: str | Path | None = None,
    val_split: float = 0.1,
    val_max_sequences: int | None = None,
) -> Dataset:
    """Reads, tokenises and cuts the data; validation comes from ``val_file``, else the data's
    own validation files or split, else a fixed-seed ``val_split`` of the documents."""
    source = discover(data, val_file=val_file)
    where = str(source.path)
    if source.pretokenised is not None:
        streams = read_pretokenised(
            source.pretokenised,
            fingerprint=tokenizer_fingerprint(tokenizer),
            vocab_size=len(tokenizer),
        )
        train = _sequences(streams["train"], seq_len, what="training", where=where)
        if source.validation_files:
            documents = read_all(source.validation_files, text_field=text_field, what="validation")
            validation = _sequences(
                tokenize_documents(documents, tokenizer),
                seq_len,
                what="validation",
                where=str(source.validation_files[0]),
            )
        elif "validation" in streams:
            validation = _sequences(streams["validation"], seq_len, what="validation", where=where)
        else:
            train, validation = train.split(val_split)
        kind = "pre-tokenised"
    else:
        train_documents = read_all(source.train_files, text_field=text_field, what="training")
        if source.validation_files:
            validation_documents = read_all(
                source.validation_files, text_field=text_field, what="validation"
            )
        else:
            try:
                train_documents, validation_documents = split_documents(train_documents, val_split)
            except DataError as error:
                raise DataError(f"{where}: {error}") from None
        train = _sequences(
            tokenize_documents(train_documents, tokenizer), seq_len, what="training", where=where
        )
        val_where = str(source.validation_files[0]) if source.validation_files else where
        validation = _sequences(
            tokenize_documents(validation_documents, tokenizer),
            seq_len,
            what="validation",
            where=val_where,
        )
        kind = "text"
    validation = validation.limit(val_max_sequences)
    description = {
        "path": where,
        "kind": kind,
        "train_files": [str(p) for p in source.train_files],
        "validation_files": [str(p) for p in source.validation_files],
        "train_sequences": len(train),
        "validation_sequences": len(validation),
        "seq_len": seq_len,
    }
    return Dataset(train, validation, description)
