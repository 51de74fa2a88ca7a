"""``python -m xffl_tasks.aggregate``: the aggregation from the command line.

    python -m xffl_tasks.aggregate --previous PREV_DIR --out OUT_DIR [--strategy NAME]
        [--weights W1,W2,...] [--names N1,N2,...] [--option KEY=VALUE ...]
        [--min-clients N] [--max-weight-share X] [--input-hashes FILE]
        [--max-samples M1,M2,...] [--norm-bound K [--norm-bound-action clip|refuse]]
        CLIENT_DIR [CLIENT_DIR ...]

On success it prints one line (where the model went, the global update norm, the seconds) and
exits 0 (clients left out by their checks are named on stderr, one line each). On bad input it prints one line, ``xffl-aggregate: error: ...``, exits 2, and leaves
nothing at OUT_DIR. An I/O failure (a full disk) is one line too, with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from xffl_tasks.aggregate.aggregation import aggregate
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.input_hashes import load_input_hashes
from xffl_tasks.aggregate.lora_options import ADAPTER_STRATEGIES
from xffl_tasks.aggregate.strategies import STRATEGIES

PROG = "xffl-aggregate"


def parse_weights(text: str) -> list[float]:
    """``"3,1.5,2"`` -> ``[3.0, 1.5, 2.0]``; a value that is not a number is an error naming it."""
    values = []
    for position, item in enumerate(text.split(","), 1):
        try:
            values.append(float(item))
        except ValueError:
            raise AggregationError(
                f"--weights: value {position} ({item.strip()!r}) is not a number"
            ) from None
    return values


def parse_max_samples(text: str) -> list[int | None]:
    """``"1000,,500"`` -> ``[1000, None, 500]`` (empty: no bound for that client)."""
    values: list[int | None] = []
    for position, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            values.append(None)
            continue
        if not item.isdigit() or len(item) > 19:
            raise AggregationError(
                f"--max-samples: value {position} ({item!r}) is not a whole number"
            )
        values.append(int(item))
    return values


def parse_names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def parse_options(items: Sequence[str]) -> dict[str, float]:
    """``["tau=1e-3", "beta1=0.8"]`` -> ``{"tau": 0.001, "beta1": 0.8}``."""
    options: dict[str, float] = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise AggregationError(f"--option {item!r} is not KEY=VALUE")
        if key in options:
            raise AggregationError(f"--option {key!r} is given twice")
        try:
            options[key] = float(value)
        except ValueError:
            raise AggregationError(f"--option {key!r}: {value.strip()!r} is not a number") from None
    return options


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors said in one line like every other error."""

    def error(self, message: str):
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Aggregates client model folders (safetensors) into the next global model.",
    )
    parser.add_argument("--previous", required=True, help="the previous global model's folder")
    parser.add_argument(
        "--out", required=True, help="the new global model's folder (must not exist)"
    )
    parser.add_argument(
        "--strategy",
        default="fedavg",
        help=f"one of {', '.join(STRATEGIES)}; for LoRA adapters {', '.join(ADAPTER_STRATEGIES)} (default fedavg)",
    )
    parser.add_argument(
        "--weights", help="W1,W2,...: one positive weight per client (default: num_samples)"
    )
    parser.add_argument("--names", help="N1,N2,...: the clients' names (default: folder names)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy option (repeatable)",
    )
    parser.add_argument(
        "--min-clients",
        type=int,
        help="how many clients must pass their checks (default: all); the others are left out",
    )
    parser.add_argument(
        "--max-weight-share",
        type=float,
        metavar="X",
        help="the largest normalised weight of a client, 0 < X <= 1 (default: no cap)",
    )
    parser.add_argument(
        "--input-hashes",
        metavar="FILE",
        help="JSON: path -> {sha256, size, mtime_ns} of input files hashed elsewhere (by the "
        "transfer); files whose size or mtime differ are hashed again (default: hash every file)",
    )
    parser.add_argument(
        "--max-samples",
        metavar="M1,M2,...",
        help="per client, the most num_samples its metrics.json may claim (empty: no bound); "
        "a client claiming more is left out",
    )
    parser.add_argument(
        "--norm-bound",
        type=float,
        metavar="K",
        help="clip (or refuse) clients whose update norm is above K x the median client norm",
    )
    parser.add_argument(
        "--norm-bound-action",
        choices=("clip", "refuse"),
        default="clip",
        help="what --norm-bound does to a client above it (default clip)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument(
        "clients", nargs="+", metavar="CLIENT_DIR", help="the clients' model folders"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        given = load_input_hashes(args.input_hashes) if args.input_hashes is not None else None
        report = aggregate(
            args.previous,
            args.clients,
            args.out,
            strategy=args.strategy,
            weights=parse_weights(args.weights) if args.weights is not None else None,
            names=parse_names(args.names) if args.names is not None else None,
            options=parse_options(args.option),
            min_clients=args.min_clients,
            max_weight_share=args.max_weight_share,
            input_hashes=given,
            max_samples=parse_max_samples(args.max_samples)
            if args.max_samples is not None
            else None,
            norm_bound=args.norm_bound,
            norm_bound_action=args.norm_bound_action,
        )
    except AggregationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    for name, reason in report["rejected"].items():
        print(f"{PROG}: warning: client {name!r} left out: {reason}", file=sys.stderr)
    for name, clip in ((report.get("norm_bound") or {}).get("clipped") or {}).items():
        print(
            f"{PROG}: warning: client {name!r} clipped: update norm {clip['norm']:.6g} "
            f"scaled by {clip['scale']:.6g} (--norm-bound)",
            file=sys.stderr,
        )
    for path in report.get("input_hashes", {}).get("stale", []):
        print(
            f"{PROG}: warning: {path} changed since its hash was given: hashed again",
            file=sys.stderr,
        )
    print(
        f"{PROG}: {report['strategy']} of {len(report['clients'])} clients written to {report['output']} "
        f"in {report['seconds']:.1f} s (global update norm {report['global_update_norm']:.6g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
