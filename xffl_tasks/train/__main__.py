"""``python -m xffl_tasks.train --model DIR --data PATH --out DIR [--config JSON] [flags]``

Fine-tunes a causal LM on local data and writes a Hugging Face model folder (safetensors,
tokenizer, metrics.json) that appears only complete. Runs alone, under ``torchrun``, or as
the tasks of an ``srun`` step. Exit status: 0 done; 2 bad input (configuration, model, data,
launch environment); 1 the training failed (a non-finite loss, an unexpected error); 143
terminated by SIGTERM (cancelled, out of time; no output is left behind). Errors
are one line on stderr: ``xffl-train: error: ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Any

from xffl_tasks.data.corpus import DataError
from xffl_tasks.launch import LaunchError
from xffl_tasks.train.checkpoint import one_line
from xffl_tasks.train.config import (
    FIELDS,
    ConfigError,
    TrainingConfig,
    TrainingError,
    build_config,
    load_config_file,
    parse_text,
)


class Terminated(BaseException):
    """SIGTERM arrived (the job was cancelled or ran out of time). A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way turns it into another
    error; ``finally`` blocks still remove the half-written output."""

    exit_code = 128 + signal.SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    # Raised where the main thread is, so the run's clean-up (no half output) still happens.
    raise Terminated("terminated by SIGTERM (the job was cancelled or reached its time limit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xffl_tasks.train",
        description=__doc__.splitlines()[0].strip("`"),
    )
    parser.add_argument(
        "--config", metavar="JSON", help="a JSON file of the same fields (flags win over it)"
    )
    defaults = TrainingConfig()
    for spec in FIELDS:
        default = getattr(defaults, spec.name)
        shown = f" (default: {default})" if default is not None else ""
        extra: dict[str, Any] = {
            "dest": spec.name,
            "default": argparse.SUPPRESS,
            "help": spec.help + shown,
        }
        if spec.kind == "bool":
            parser.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **extra)
        else:
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else spec.name.upper()
            parser.add_argument(spec.flag, metavar=metavar, **extra)
    return parser


def parse_arguments(argv: list[str] | None) -> Any:
    """The validated configuration: defaults, then ``--config``, then the flags."""
    namespace = vars(build_parser().parse_args(argv))
    config_file = namespace.pop("config", None)
    file_values = load_config_file(config_file) if config_file else {}
    flag_values = {}
    for spec in FIELDS:
        if spec.name in namespace:
            raw = namespace[spec.name]
            flag_values[spec.name] = (
                raw if isinstance(raw, bool) else parse_text(spec, raw, where=spec.flag)
            )
    return build_config(file_values, flag_values).require_paths()


def _rank_label() -> str:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "0") not in ("", "0"):
            return f"[rank {os.environ[name]}]"
    return ""


def _configure_logging(prog: str = "xffl-train") -> None:
    """Log lines on stderr headed by ``prog`` and the rank; rank 0 at INFO, the others WARNING."""
    main = _rank_label() == ""
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format=f"%(asctime)s {prog}{_rank_label()} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    label = f"xffl-train{_rank_label()}"
    try:
        config = parse_arguments(argv)
        _configure_logging()
        from xffl_tasks.train.recipe import run

        run(config)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
