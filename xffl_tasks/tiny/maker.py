"""Makes the tiny model and the two corpora into a folder, all or nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from xffl_tasks.tiny.model import TinyModelSpec

TRAIN_DOCUMENTS = 2000
VALIDATION_DOCUMENTS = 200


def make_tiny(
    out: Path,
    *,
    seed: int = 0,
    spec: TinyModelSpec | None = None,
    train_documents: int = TRAIN_DOCUMENTS,
    validation_documents: int = VALIDATION_DOCUMENTS,
) -> Path:
    """Writes the tiny model and corpora to ``out`` (which must not exist, or be empty)."""
    from xffl_tasks.tiny.corpora import LANGUAGES, make_corpus
    from xffl_tasks.tiny.model import make_model, save_model, train_tokenizer

    spec = spec or TinyModelSpec()

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out}: already exists and is not an empty folder; choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        corpora = {
            language: make_corpus(
                language,
                seed=seed,
                train_documents=train_documents,
                validation_documents=validation_documents,
            )
            for language in LANGUAGES
        }
        for language, (train, validation) in corpora.items():
            folder = staging / "data" / language
            folder.mkdir(parents=True)
            for name, documents in (("train", train), ("validation", validation)):
                with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(
                        json.dumps({"text": document}, ensure_ascii=False) + "\n"
                        for document in documents
                    )
        tokenizer = train_tokenizer(
            (doc for train, _ in corpora.values() for doc in train),
            vocab_size=spec.vocab_size,
            max_length=spec.max_position_embeddings,
        )
        model = make_model(tokenizer, spec, seed=seed)
        save_model(model, tokenizer, staging / "model")
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
