"""``python -m xffl_tasks.evaluate --candidate NAME=DIR [...] [--base DIR] --data PATH --out DIR
[--config JSON] [training flags]``

Evaluates one or several models on the facility's validation data, exactly as the training
task computes ``val_loss_before`` (same split, tokenizer, ``seq_len``, seed, batch size and
evaluation loop), and writes ``DIR/evaluation.json`` atomically. No training. With ``--base``
every candidate is a LoRA adapter folder applied to that base. Runs alone, under ``torchrun``
or as the tasks of an ``srun`` step, as training does. Exit status: 0 done; 2 bad input
(configuration, a model or adapter folder that does not load, a pickle checkpoint, missing
data, the launch environment); 1 the evaluation failed (a non-finite loss, an unexpected
error); 143 terminated by SIGTERM. Errors are one line on stderr: ``xffl-evaluate: error: ...``.
"""

from __future__ import annotations

import signal
import sys
import traceback

from xffl_tasks.data.corpus import DataError
from xffl_tasks.launch import LaunchError
from xffl_tasks.train.__main__ import Terminated, _configure_logging, _on_sigterm, _rank_label
from xffl_tasks.train.checkpoint import one_line
from xffl_tasks.train.config import ConfigError, TrainingError

PROG = "xffl-evaluate"


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    label = f"{PROG}{_rank_label()}"
    try:
        from xffl_tasks.evaluate.config import parse_arguments

        config = parse_arguments(argv)
        _configure_logging(PROG)
        from xffl_tasks.evaluate.run import run

        record = run(config)
    except (ConfigError, DataError, LaunchError) as error:
        print(f"{label}: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"{label}: error: {error}", file=sys.stderr)
        return error.exit_code
    except Terminated as error:
        print(f"{label}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{label}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the traceback for the log, then one line
        traceback.print_exc()
        print(
            f"{label}: error: unexpected {type(error).__name__}: {one_line(error)}", file=sys.stderr
        )
        return 1
    if not _rank_label():
        losses = ", ".join(
            f"{name} {entry['val_loss']:.6f}" for name, entry in record["candidates"].items()
        )
        print(f"{PROG}: {losses} ({record['seq_len']} tokens a sequence)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
