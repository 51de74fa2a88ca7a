"""What a pull may write on the worker, decided by the caller, checked against the facility's
listing before a byte is written. Pure (``PullBudget.for_model`` only reads the pushed folder).

A facility is untrusted: without a budget, its listing decides how many files and bytes a pull
writes (20,002 files announcing 81 GB pass, only free disk space is checked). A ``PullBudget``
says which files may come (``FileAllowance``: a name pattern, each file's size, how many, all of
them together) and how many files and bytes in all. ``check_listing`` refuses anything more with
``PullRefused``, naming the facility, the file and the limit; the pull calls it on the remote
listing (and stops listing once it holds more entries than ``max_files``), so a refused pull
writes nothing. A file is never written past the size its listing announced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_airflow.transfer.errors import TransferError
from xffl_airflow.transfer.facility import is_part_name

KIB = 1024
MIB = 1024 * KIB
# metrics.json: what the aggregation reads of it at most (xffl_tasks.aggregate.metrics).
METRICS_LIMIT = 64 * KIB
# Slack over the pushed weights, all weight files together: the trained weights have the same
# tensors, names and dtypes, but may be sharded otherwise (``max_shard_size``), and each
# shard's header lists its own tensors.
WEIGHTS_MARGIN = 4 * MIB
# A config or tokenizer file: at most twice its pushed counterpart (the largest pushed one for
# a name that was not pushed, e.g. ``tokenizer.json`` written from ``tokenizer.model``) plus this.
SMALL_FILE_LIMIT = 1 * MIB
# Files beyond those pushed that a pull may hold by default (an index, a generation config, a
# few more shards).
EXTRA_FILES = 16

FULL_WEIGHTS = r"model(?:-[0-9]{5}-of-[0-9]{5})?\.safetensors"
ADAPTER_WEIGHTS = r"adapter_model\.safetensors"
METRICS = "metrics.json"
# Files a trained model folder may hold besides its weights (what ``save_pretrained`` of a
# model and of its tokenizer write); an adapter folder holds only ``ADAPTER_FILES``.
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
ADAPTER_FILES = ("adapter_config.json",)


class PullRefused(TransferError):
    """The facility's listing holds more than the pull's budget allows: nothing was written.

    Not retryable (the same listing is refused again): the round sets the facility aside.

    :param facility: the facility's name
    :param file: the file (relative path) that crossed a limit, or None for the file count
    :param limit: the limit crossed, as a number (files or bytes)
    :param reason: what was refused, for the message
    """

    def __init__(self, facility: str, reason: str, *, file: str | None, limit: int | None,
                 path: str | None = None):  # fmt: skip
        super().__init__(
            facility, f"pull refused before writing anything: {reason}", path=path or file
        )
        self.file = file
        self.limit = limit
        self.reason = reason


@dataclass(frozen=True)
class FileAllowance:
    """Files a pull may write: relative paths that ``pattern`` (a regular expression) matches
    whole, each at most ``max_bytes``, at most ``max_count`` of them (None: only the budget's
    file count), all of them together at most ``max_total_bytes`` (None: only the budget's).

    :param what: what these files are, for errors ("weights", "metrics.json")
    """

    pattern: str
    max_bytes: int
    max_count: int | None = 1
    max_total_bytes: int | None = None
    what: str = ""

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        for name in ("max_bytes", "max_count", "max_total_bytes"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(
                    f"FileAllowance {self.pattern!r}: {name} must be a whole number >= 0, got {value!r}"
                )

    @classmethod
    def exact(cls, name: str, max_bytes: int, what: str = "") -> FileAllowance:
        """One file of exactly this relative path."""
        return cls(re.escape(name), max_bytes, 1, None, what or name)

    def matches(self, relative: str) -> bool:
        return re.fullmatch(self.pattern, relative) is not None

    @property
    def label(self) -> str:
        return self.what or self.pattern

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "max_bytes": self.max_bytes, "max_count": self.max_count,
                "max_total_bytes": self.max_total_bytes, "what": self.what}  # fmt: skip


@dataclass(frozen=True)
class PullBudget:
    """What one pull may write: at most ``max_files`` files of ``max_total_bytes`` in all, each
    matching one of ``allowed`` (the first that matches counts it) within its limits."""

    max_files: int
    max_total_bytes: int
    allowed: tuple[FileAllowance, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("max_files", "max_total_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PullBudget: {name} must be a whole number >= 1, got {value!r}")
        object.__setattr__(self, "allowed", tuple(self.allowed))

    @classmethod
    def for_model(
        cls,
        pushed_folder: Path,
        *,
        adapter: bool,
        max_total_bytes: int | None = None,
        max_files: int | None = None,
    ) -> PullBudget:
        """The budget of pulling what a facility trained from the model folder (``adapter``:
        the LoRA adapter folder) pushed to it, ``pushed_folder`` (symlinks followed):

        - weights (``model.safetensors`` or ``model-NNNNN-of-NNNNN.safetensors``; for an
          adapter ``adapter_model.safetensors``): each, and all together, at most the pushed
          weights' total plus ``WEIGHTS_MARGIN``: the same tensors, however sharded;
        - ``metrics.json``: at most ``METRICS_LIMIT`` (64 KiB);
        - config and tokenizer files (``MODEL_FILES``, for an adapter ``ADAPTER_FILES``, and
          any other non-weight file that was pushed): each at most twice its pushed size (the
          largest pushed one's, for a name not pushed) plus ``SMALL_FILE_LIMIT``.

        ``max_total_bytes`` and ``max_files`` (the caller's, from the config) replace the
        defaults: the sum of those limits (weights, metrics, and each pushed config file), and
        the pushed files plus ``EXTRA_FILES``.
        """
        pushed = _pushed_sizes(Path(pushed_folder))
        weights_re = ADAPTER_WEIGHTS if adapter else FULL_WEIGHTS
        weights = {name: size for name, size in pushed.items() if re.fullmatch(weights_re, name)}
        if not weights:
            kind = "adapter" if adapter else "model"
            raise ValueError(f"pushed {kind} folder {pushed_folder} holds no {kind} weights "
                             f"({weights_re.replace(chr(92), '')})")  # fmt: skip
        others = {
            name: size for name, size in pushed.items() if name not in weights and name != METRICS
        }
        weights_limit = sum(weights.values()) + WEIGHTS_MARGIN
        largest_other = max(others.values(), default=0)
        allowed = [
            FileAllowance(
                weights_re,
                weights_limit,
                None,
                weights_limit,
                "adapter weights" if adapter else "model weights",
            ),  # fmt: skip
            FileAllowance.exact(METRICS, METRICS_LIMIT, "metrics.json"),
        ]
        names = sorted(set(ADAPTER_FILES if adapter else MODEL_FILES) | set(others))
        for name in names:
            limit = 2 * others.get(name, largest_other) + SMALL_FILE_LIMIT
            allowed.append(FileAllowance.exact(name, limit, "config or tokenizer file"))
        default_total = (
            weights_limit
            + METRICS_LIMIT
            + sum(2 * size + SMALL_FILE_LIMIT for size in others.values())
        )
        return cls(
            max_files=max_files if max_files is not None else len(pushed) + EXTRA_FILES,
            max_total_bytes=max_total_bytes if max_total_bytes is not None else default_total,
            allowed=tuple(allowed),
        )

    @classmethod
    def for_adapter(cls, weights_limit: int, *, max_total_bytes: int | None = None,
                    max_files: int | None = None) -> PullBudget:  # fmt: skip
        """The budget of pulling a new LoRA adapter whose weights are at most ``weights_limit``
        bytes (a lora-stacked round: nothing adapter-shaped was pushed; the limit comes from the
        base's shapes and the facility's rank): the weights, ``adapter_config.json`` and
        ``metrics.json``."""
        allowed = (
            FileAllowance(ADAPTER_WEIGHTS, weights_limit + WEIGHTS_MARGIN, 1, None, "adapter weights"),
            FileAllowance.exact("adapter_config.json", SMALL_FILE_LIMIT, "adapter config"),
            FileAllowance.exact(METRICS, METRICS_LIMIT, "metrics.json"),
        )
        default_total = weights_limit + WEIGHTS_MARGIN + SMALL_FILE_LIMIT + METRICS_LIMIT
        return cls(max_files=max_files if max_files is not None else 3,
                   max_total_bytes=max_total_bytes if max_total_bytes is not None else default_total,
                   allowed=allowed)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (for a plan, a report or a log)."""
        return {"max_files": self.max_files, "max_total_bytes": self.max_total_bytes,
                "allowed": [a.to_dict() for a in self.allowed]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PullBudget:
        return cls(
            max_files=data["max_files"],
            max_total_bytes=data["max_total_bytes"],
            allowed=tuple(FileAllowance(**a) for a in data.get("allowed", ())),
        )


def _pushed_sizes(folder: Path) -> dict[str, int]:
    """Relative path: size of every file below ``folder`` (symlinks followed; our temporary
    names left out)."""
    if not folder.is_dir():
        raise ValueError(f"pushed folder {folder} does not exist or is not a folder")
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not is_part_name(path.name):
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def check_listing(budget: PullBudget, listing: Iterable[tuple[str, int]], *, facility: str) -> None:
    """Raises ``PullRefused`` unless every ``(relative path, size)`` of the facility's listing
    fits ``budget``: the count, each file's allowance (its pattern, its size, the allowance's
    count and total), and the total. Checked in the listing's order; the first excess is named.
    """
    files = list(listing)
    if len(files) > budget.max_files:
        raise PullRefused(
            facility,
            f"the remote folder holds {len(files)} files, more than the {budget.max_files} the "
            f"pull allows (max_files)",
            file=None, limit=budget.max_files,
        )  # fmt: skip
    counts = [0] * len(budget.allowed)
    totals = [0] * len(budget.allowed)
    total = 0
    for relative, size in files:
        index = next((i for i, a in enumerate(budget.allowed) if a.matches(relative)), None)
        if index is None:
            raise PullRefused(
                facility,
                f"file {relative!r} ({size} bytes) is not one the pull expects "
                f"(allowed: {', '.join(a.label for a in budget.allowed) or 'nothing'})",
                file=relative, limit=0,
            )  # fmt: skip
        allowance = budget.allowed[index]
        if size > allowance.max_bytes:
            raise PullRefused(
                facility,
                f"file {relative!r} announces {size} bytes, more than the {allowance.max_bytes} "
                f"allowed for it ({allowance.label})",
                file=relative, limit=allowance.max_bytes,
            )  # fmt: skip
        counts[index] += 1
        totals[index] += size
        total += size
        if allowance.max_count is not None and counts[index] > allowance.max_count:
            raise PullRefused(
                facility,
                f"file {relative!r} is one more than the {allowance.max_count} file(s) allowed "
                f"of {allowance.label}",
                file=relative, limit=allowance.max_count,
            )  # fmt: skip
        if allowance.max_total_bytes is not None and totals[index] > allowance.max_total_bytes:
            raise PullRefused(
                facility,
                f"file {relative!r} brings {allowance.label} to {totals[index]} bytes, more than "
                f"the {allowance.max_total_bytes} allowed for them together",
                file=relative, limit=allowance.max_total_bytes,
            )  # fmt: skip
        if total > budget.max_total_bytes:
            raise PullRefused(
                facility,
                f"file {relative!r} brings the pull to {total} bytes, more than its budget of "
                f"{budget.max_total_bytes} (max_total_bytes)",
                file=relative, limit=budget.max_total_bytes,
            )  # fmt: skip
