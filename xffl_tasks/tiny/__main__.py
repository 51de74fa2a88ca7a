"""``python -m xffl_tasks.tiny --out DIR [--seed N]``: the tiny model and two corpora, offline.

Makes, deterministically (the same seed gives the same bytes):

- ``DIR/model/``: a tiny LLaMA-architecture causal LM (config, safetensors weights, generation
  config) with a byte-level BPE tokenizer trained on the two training corpora;
- ``DIR/data/italian/`` and ``DIR/data/czech/``: ``train.jsonl`` and ``validation.jsonl``,
  one ``{"text": ...}`` document a line.

Everything is written into a temporary folder beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xffl_tasks.tiny.maker import make_tiny
from xffl_tasks.tiny.model import TinyModelSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xffl_tasks.tiny", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder to create (must not exist, or be empty)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the corpora and of the model's initial weights"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the saved weights",
    )
    parser.add_argument(
        "--untied",
        action="store_true",
        help="separate input and output embeddings (tied by default)",
    )
    parser.add_argument(
        "--layers", type=int, default=TinyModelSpec.num_hidden_layers, help="decoder layers"
    )
    parser.add_argument(
        "--hidden-size", type=int, default=TinyModelSpec.hidden_size, help="hidden size"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=TinyModelSpec.vocab_size, help="BPE vocabulary size"
    )
    args = parser.parse_args(argv)
    if (
        args.seed < 0
        or args.layers < 1
        or args.hidden_size < 8
        or args.hidden_size % 8
        or args.vocab_size < 300
    ):
        parser.error(
            "--seed >= 0, --layers >= 1, --hidden-size a multiple of 8, --vocab-size >= 300"
        )
    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4 // 8 * 8,
        num_hidden_layers=args.layers,
        tie_word_embeddings=not args.untied,
        dtype=args.dtype,
    )
    try:
        make_tiny(args.out, seed=args.seed, spec=spec)
    except FileExistsError as error:
        print(f"xffl-tiny: error: {error}", file=sys.stderr)
        return 2
    print(f"OK {args.out}: model/, data/italian/, data/czech/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
