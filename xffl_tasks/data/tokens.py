"""Token streams and the fixed-length training sequences cut from them.

Documents are tokenised (BOS, text, EOS, when the tokenizer has them), concatenated into one
stream of token ids, and cut into sequences of ``seq_len`` tokens (the tail that does not fill
a sequence is dropped). A pre-tokenised folder holds such streams ready for large corpora:

    xffl_tokens.json     {"format": "xffl-tokens", "version": 1, "dtype": "uint16"|"uint32",
                          "vocab_size": N, "tokenizer": "<fingerprint>",
                          "splits": {"train": {"file": "train.bin", "tokens": T, "documents": D},
                                     "validation": {...}}}     (validation optional)
    train.bin            the token ids, little-endian, memory-mapped when read

No pickle anywhere: the streams are raw integer arrays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xffl_tasks.data.corpus import PRETOKENISED_MARKER, DataError

FORMAT = "xffl-tokens"
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# The validation split of text data is fixed, whatever the training seed: the validation set
# stays the same across rounds, so losses of successive rounds compare.
SPLIT_SEED = 20240917


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary and special ids: the same tokenizer gives the same value
    whatever file formatting a ``save_pretrained`` produced."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    payload = json.dumps([vocab, special], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenize_documents(documents: Sequence[str], tokenizer: Any, *, batch: int = 512) -> np.ndarray:
    """One stream of token ids: each document as BOS + tokens + EOS (where defined)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[np.ndarray] = []
    for start in range(0, len(documents), batch):
        encoded = tokenizer(list(documents[start : start + batch]), add_special_tokens=False)[
            "input_ids"
        ]
        for ids in encoded:
            pieces.append(np.asarray(bos + list(ids) + eos, dtype=np.int64))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(pieces)


def split_documents(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training, validation) documents; the validation ones a fixed-seed choice of
    ``max(1, round(n * fraction))`` documents, in their original order."""
    count = len(documents)
    if count < 2:
        raise DataError(
            f"only {count} document(s): cannot hold some out for validation; give a validation file"
        )
    n_val = min(count - 1, max(1, round(count * fraction)))
    chosen = set(
        np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(count)[:n_val].tolist()
    )
    train = [doc for i, doc in enumerate(documents) if i not in chosen]
    validation = [doc for i, doc in enumerate(documents) if i in chosen]
    return train, validation


@dataclass(frozen=True)
class Sequences:
    """Sequences of ``seq_len`` tokens cut from a stream; ``index`` picks which blocks."""

    tokens: np.ndarray
    seq_len: int
    index: np.ndarray

    @classmethod
    def from_stream(cls, tokens: np.ndarray, seq_len: int) -> Sequences:
        return cls(tokens, seq_len, np.arange(len(tokens) // seq_len))

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, positions: np.ndarray) -> np.ndarray:
        """The sequences at ``positions`` as an int64 array ``[len(positions), seq_len]``."""
        rows = [
            self.tokens[b * self.seq_len : (b + 1) * self.seq_len] for b in self.index[positions]
        ]
        return np.stack(rows).astype(np.int64)

    def limit(self, count: int | None) -> Sequences:
        return (
            self
            if count is None or count >= len(self)
            else Sequences(self.tokens, self.seq_len, self.index[:count])
        )

    def split(self, fraction: float) -> tuple[Sequences, Sequences]:
        """(training, validation) by whole sequences, a fixed-seed choice (pre-tokenised data)."""
        count = len(self)
        if count < 2:
            raise DataError(
                f"only {count} sequence(s): cannot hold some out for validation; give validation data"
            )
        n_val = min(count - 1, max(1, round(count * fraction)))
        order = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(count)
        return (
            Sequences(self.tokens, self.seq_len, np.sort(self.index[order[n_val:]])),
            Sequences(self.tokens, self.seq_len, np.sort(self.index[order[:n_val]])),
        )


def write_pretokenised(
    out: Path, *, splits: dict[str, tuple[np.ndarray, int]], vocab_size: int, fingerprint: str
) -> None:
    """Writes a pre-tokenised folder's files into ``out`` (an empty folder; the caller renames)."""
    dtype_name = "uint16" if vocab_size <= 65536 else "uint32"
    dtype = DTYPES[dtype_name]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype_name,
        "vocab_size": vocab_size,
        "tokenizer": fingerprint,
        "splits": {},
    }
    for name, (tokens, documents) in splits.items():
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise DataError(f"{name}: token ids outside the vocabulary (0..{vocab_size - 1})")
        path = out / f"{name}.bin"
        tokens.astype(dtype).tofile(path)
        meta["splits"][name] = {
            "file": path.name,
            "tokens": len(tokens),
            "documents": int(documents),
        }
    (out / PRETOKENISED_MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_pretokenised(folder: Path, *, fingerprint: str, vocab_size: int) -> dict[str, np.ndarray]:
    """The token streams of a pre-tokenised folder (memory-mapped), checked against the model's
    tokenizer: the ids must mean the same tokens."""
    marker = folder / PRETOKENISED_MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{marker}: unreadable: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{marker}: not an {FORMAT} v{VERSION} description")
    if meta.get("tokenizer") != fingerprint:
        raise DataError(
            f"{marker}: tokenised with another tokenizer than the model's; tokenise it again"
        )
    if meta.get("vocab_size") != vocab_size:
        raise DataError(
            f"{marker}: vocab_size {meta.get('vocab_size')} is not the tokenizer's {vocab_size}"
        )
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise DataError(f"{marker}: dtype must be one of {', '.join(DTYPES)}")
    streams = {}
    for name, split in (meta.get("splits") or {}).items():
        try:
            path = folder / Path(split["file"]).name
            count = int(split["tokens"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{marker}: splits.{name}: needs 'file' and 'tokens'") from None
        try:
            size = path.stat().st_size
        except OSError as error:
            raise DataError(f"{path}: cannot read the token file: {error.strerror}") from None
        if size != count * dtype.itemsize:
            raise DataError(
                f"{path}: {size} bytes, expected {count * dtype.itemsize} ({count} tokens): truncated or changed"
            )
        streams[name] = (
            np.memmap(path, dtype=dtype, mode="r", shape=(count,))
            if count
            else np.zeros(0, dtype=dtype)
        )
    if "train" not in streams:
        raise DataError(f"{marker}: no 'train' split")
    return streams
