"""``python -m xffl_tasks.data.pretokenize --model DIR --data PATH --out DIR``: tokenises a
corpus once, for large corpora that should not be tokenised again by every process of every
round. The output folder (see :mod:`xffl_tasks.data.tokens`) is then the training task's
``--data``; it appears only complete."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from xffl_tasks.data.corpus import DataError, discover, read_all
from xffl_tasks.data.tokens import tokenize_documents, tokenizer_fingerprint, write_pretokenised


def pretokenise(*, model: Path, data: Path, out: Path, text_field: str = "text") -> dict:
    from transformers import AutoTokenizer

    if out.exists():
        raise DataError(f"{out}: already exists; choose a new output folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any loader failure is reported as one line
        raise DataError(
            f"{model}: cannot load the tokenizer: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    source = discover(data)
    if source.pretokenised is not None:
        raise DataError(f"{data}: already pre-tokenised")
    splits = {}
    documents = read_all(source.train_files, text_field=text_field, what="training")
    splits["train"] = (tokenize_documents(documents, tokenizer), len(documents))
    if source.validation_files:
        documents = read_all(source.validation_files, text_field=text_field, what="validation")
        splits["validation"] = (tokenize_documents(documents, tokenizer), len(documents))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_pretokenised(
            staging,
            splits=splits,
            vocab_size=len(tokenizer),
            fingerprint=tokenizer_fingerprint(tokenizer),
        )
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: len(tokens) for name, (tokens, _) in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xffl_tasks.data.pretokenize", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", required=True, type=Path, help="the model folder whose tokenizer to use"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="a .jsonl/.txt file or a folder of them"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the pre-tokenised folder to create"
    )
    parser.add_argument(
        "--text-field", default="text", help="the JSON-lines field that holds the text"
    )
    args = parser.parse_args(argv)
    try:
        counts = pretokenise(
            model=args.model, data=args.data, out=args.out, text_field=args.text_field
        )
    except DataError as error:
        print(f"xffl-pretokenize: error: {error}", file=sys.stderr)
        return 2
    print(
        f"OK {args.out}: " + ", ".join(f"{name} {count} tokens" for name, count in counts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
