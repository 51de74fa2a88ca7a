"""Merging a ``lora-stacked`` update into a base model folder: the facility's and the canonical.

    python -m xffl_tasks.stacked_merge --base DIR --update DIR --out DIR
    python -m xffl_tasks.stacked_merge --base DIR --expect BASE_HASHES_JSON   (a check only)

:func:`merge_into` is the one merge, used by the aggregation (the canonical base) and by every
facility (:func:`merge_stacked_update`), so both get the same bytes from the same inputs:
every adapted weight becomes ``dtype(float32(W) + D)`` with ``D`` summed rank-one term by term
in stack order (``lora_stacked_math``), on one torch thread; every other tensor, the shards'
headers (same names, dtypes, shapes, offsets) and the other files (config, tokenizer, index)
are copied byte for byte. It streams one tensor at a time, hashing each shard as it reads and
writes it.

:func:`merge_stacked_update` checks the facility's base against the update's ``base`` record
(the files' sha256, taken while merging) and the result against its ``result`` record (the
canonical base's), naming the first differing tensor; the output is written beside ``out`` and
renamed into place only when both match. A merged weight that holds NaN or Inf is refused
(:class:`NonFiniteMerge`, naming the tensor) before it is written, in both merges: the
aggregation then leaves out the clients that caused it; a facility never trains on it. An
``out`` that already holds the recorded result (a retried job) is checked and kept. Exit
status: 0; 2 a refused input (one line on stderr, ``xffl-stacked-merge: error: ...``); 1 an
I/O error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_tasks.base_hashes import (
    BaseHashError,
    BaseHashes,
    BaseMismatch,
    TensorHash,
    check_base_hashes,
    compare_hashes,
    load_base_hashes,
)
from xffl_tasks.stacked_update import StackedUpdate, StackedUpdateError, read_stacked_update

PROG = "xffl-stacked-merge"
#: What a facility's job treats as a refused input (exit status 2).
REFUSALS = (BaseHashError, StackedUpdateError)
#: Tensors read and merged ahead of the lane that hashes and writes them (memory: as many
#: tensors in and out; LLaMA-2-7B's largest is 262 MB in bf16).
LANE_DEPTH = 2


class NonFiniteMerge(StackedUpdateError):
    """A merged weight holds NaN or Inf: refused before it is written. ``tensor`` names the
    weight, ``kind`` and ``index`` its first non-finite element; ``weight`` is the base's
    weight as read (for the aggregation's search of the clients that caused it)."""

    def __init__(self, message: str, *, tensor: str, kind: str, index: list[int], weight: Any) -> None:
        super().__init__(message)
        self.tensor, self.kind, self.index, self.weight = tensor, kind, index, weight


@dataclass
class MergeOutcome:
    """What a merge read and wrote: the input's and the output's hashes (per tensor too when
    asked), per adapted weight the update's norm and the part rounding to the base's dtype
    lost, the bytes and the seconds."""

    input: BaseHashes
    output: BaseHashes
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    reused: bool = False


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread (restored after): the merge's fixed thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_fits(folder: Any, update: StackedUpdate, *, label: str) -> None:
    """Every stacked module names a 2-D floating weight of the base of its shape."""
    for module in update.modules.values():
        location = folder.tensors.get(module.weight)
        if location is None:
            raise StackedUpdateError(f"{label}: the update adapts {module.weight!r}, which the base lacks")
        entry = location.entry
        if tuple(entry.shape) != module.shape or not entry.dtype.floating:
            raise StackedUpdateError(
                f"{label}: the update's {module.weight!r} is {list(module.shape)}, the base's "
                f"{entry.dtype.name} {list(entry.shape)}"
            )


def merge_into(
    stage: Path,
    folder: Any,
    layers: Mapping[str, tuple[Any, Any]],
    *,
    tensor_hashes: bool,
    statistics: bool = False,
) -> MergeOutcome:
    """Writes ``folder`` (an ``open_model_folder`` result) with ``layers`` (base weight name ->
    float32 ``(stacked_A, stacked_B)``) merged into the empty folder ``stage``; fsyncs every
    file. ``tensor_hashes``: also hash every tensor (of the input, and the merged ones of the
    output), for a record that names diverged tensors. ``statistics``: per merged weight the
    update's norm and the part of it rounding lost (``layers``; a few passes over the weight).
    Raises :class:`NonFiniteMerge` when a merged weight is not finite (nothing of it written)."""
    import torch

    from xffl_tasks.aggregate.finite_output import first_non_finite
    from xffl_tasks.aggregate.lora_stacked_math import merge_weight, rounding_loss

    started = time.perf_counter()
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    in_tensors: dict[str, TensorHash] = {}
    out_tensors: dict[str, TensorHash] = {}
    outcome = MergeOutcome(BaseHashes(inputs, in_tensors), BaseHashes(outputs, out_tensors))
    # the hashing and writing run on a lane of their own, in order, while this thread reads and
    # merges the next tensors (hashlib and file writes release the GIL): the bytes are the same
    with one_thread(), ThreadPoolExecutor(1, thread_name_prefix="merge-lane") as lane:
        pending: deque[Future] = deque()
        for shard in folder.shards:
            read_hash = hashlib.sha256(shard.header.header_bytes)
            write_hash = hashlib.sha256(shard.header.header_bytes)
            with open(shard.path, "rb") as source, open(stage / shard.file, "xb") as target:
                target.write(shard.header.header_bytes)  # same tensors, same offsets

                def consume(entry: Any, raw: bytes, out: bytes, changed: bool) -> None:
                    read_hash.update(raw)
                    write_hash.update(out)
                    target.write(out)
                    if tensor_hashes:
                        shape, dtype = tuple(entry.shape), entry.dtype.name
                        digest = hashlib.sha256(raw).hexdigest()
                        in_tensors[entry.name] = TensorHash(shard.file, dtype, shape, digest)
                        if changed:
                            digest = hashlib.sha256(out).hexdigest()
                        out_tensors[entry.name] = TensorHash(shard.file, dtype, shape, digest)

                try:
                    for entry in shard.header.tensors:
                        raw = os.pread(source.fileno(), entry.nbytes, shard.header.data_start + entry.begin)
                        if len(raw) != entry.nbytes:
                            raise StackedUpdateError(f"{folder.label}: {shard.file} is truncated at {entry.name!r}")
                        out = raw
                        if entry.name in layers:
                            a_stack, b_stack = layers[entry.name]
                            weight = torch.frombuffer(bytearray(raw), dtype=entry.dtype.torch)
                            weight = weight.view(tuple(entry.shape))
                            merged, delta = merge_weight(weight, a_stack, b_stack)
                            bad = first_non_finite(merged)
                            if bad is not None:
                                raise NonFiniteMerge(
                                    f"{folder.label}: the update makes {entry.name!r} non-finite "
                                    f"({bad[0]} at {bad[1]}): refused, not written",
                                    tensor=entry.name, kind=bad[0], index=bad[1], weight=weight,
                                )  # fmt: skip
                            if statistics:
                                norm, lost = rounding_loss(weight, merged, delta)
                                outcome.layers[entry.name] = {"update_norm": norm, "rounding_loss": lost}
                            out = merged.contiguous().view(torch.uint8).numpy().tobytes()
                            del weight, merged, delta
                        pending.append(lane.submit(consume, entry, raw, out, out is not raw))
                        while len(pending) > LANE_DEPTH:
                            pending.popleft().result()
                    while pending:
                        pending.popleft().result()
                finally:  # on an error, the lane is done with the files before they close
                    wait(pending)
                target.flush()
                os.fsync(target.fileno())
            inputs[shard.file] = read_hash.hexdigest()
            outputs[shard.file] = write_hash.hexdigest()
            outcome.bytes_read += shard.header.file_size
            outcome.bytes_written += shard.header.file_size
    written = {shard.file for shard in folder.shards}
    from xffl_tasks.aggregate.files import copy_file

    for path in sorted(folder.path.iterdir()):
        if path.is_file() and path.name not in written:
            digest, size = copy_file(path, stage / path.name)
            inputs[path.name] = outputs[path.name] = digest
            outcome.bytes_read += size
            outcome.bytes_written += size
    for path in stage.iterdir():
        path.chmod(0o644)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _open_base(base_dir: Path, label: str) -> Any:
    from xffl_tasks.aggregate.errors import AggregationError
    from xffl_tasks.aggregate.model_folder import open_model_folder

    try:
        return open_model_folder(base_dir, label=label)
    except AggregationError as error:
        raise StackedUpdateError(str(error)) from None


def _check_structure(folder: Any, record: BaseHashes, *, label: str) -> None:
    """The base's tensors (names, shards, dtypes, shapes, from the headers) against the
    record's, before any byte is read: a base of another model fails here, naming the tensor."""
    if not record.tensors:
        return
    for name, want in record.tensors.items():
        location = folder.tensors.get(name)
        if location is None:
            raise BaseMismatch(f"{label}: lacks tensor {name!r} of the expected base", file=want.file, tensor=name)
        have = (location.shard.file, location.entry.dtype.name, tuple(location.entry.shape))
        if have != (want.file, want.dtype, want.shape):
            raise BaseMismatch(
                f"{label}: tensor {name!r} is {have[1]} {list(have[2])} in {have[0]}, the expected base's "
                f"{want.dtype} {list(want.shape)} in {want.file}",
                file=want.file,
                tensor=name,
            )
    extra = sorted(set(folder.tensors) - set(record.tensors))
    if extra:
        raise BaseMismatch(
            f"{label}: tensor {extra[0]!r} is not in the expected base",
            file=folder.tensors[extra[0]].shard.file,
            tensor=extra[0],
        )


def merge_stacked_update(
    base_dir: str | Path,
    stacked_dir: str | Path | StackedUpdate,
    out_dir: str | Path,
    *,
    expected: BaseHashes | None = None,
) -> MergeOutcome:
    """A facility's merge: ``base_dir`` with the stacked update merged, at ``out_dir``.

    The base is checked against the update's ``base`` record, the result against its
    ``result`` record and ``expected`` (when given): any difference raises
    :class:`~xffl_tasks.base_hashes.BaseMismatch` naming the tensor, and nothing is left at
    ``out_dir``. A merged weight that is not finite raises :class:`NonFiniteMerge` naming
    it (exit status 2), nothing left either. An existing ``out_dir`` is kept if it holds the
    recorded result (a retry), refused otherwise.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    update = stacked_dir if isinstance(stacked_dir, StackedUpdate) else read_stacked_update(stacked_dir)
    wanted = [record for record in (update.result, expected) if record is not None]
    if os.path.lexists(out_dir):
        if not wanted:
            raise StackedUpdateError(f"{out_dir}: already exists, and the update records no result to check it against")
        started = time.perf_counter()
        got = check_base_hashes(out_dir, wanted[0])
        for record in wanted[1:]:
            compare_hashes(got, record, folder=out_dir, label=f"merged base {out_dir}")
        return MergeOutcome(BaseHashes({}), got, seconds=time.perf_counter() - started, reused=True)
    base_label = f"base {base_dir}"
    folder = _open_base(base_dir, base_label)
    if update.base is not None:
        _check_structure(folder, update.base, label=f"{base_label} is not the base the update applies to")
    check_fits(folder, update, label=base_label)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        outcome = merge_into(stage, folder, update.layers(), tensor_hashes=False)
        if update.base is not None:
            compare_hashes(
                outcome.input, update.base, folder=base_dir,
                label=f"{base_label} is not the base the update applies to",
            )  # fmt: skip
        for record in wanted:
            compare_hashes(
                outcome.output, record, folder=stage,
                label=f"the merge of {base_dir} is not the canonical base",
            )  # fmt: skip
        os.chmod(stage, 0o755)
        from xffl_tasks.aggregate.staging import fsync_directory, rename_no_replace

        fsync_directory(stage)
        rename_no_replace(stage, out_dir)
        fsync_directory(out_dir.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model folder (safetensors)")
    parser.add_argument("--update", help="the stacked update folder (lora-stacked)")
    parser.add_argument("--out", help="the merged base's folder (must not exist, or hold the result)")
    parser.add_argument("--expect", metavar="JSON", help="a base_hashes.json the result (or, without --update, the base) must match")
    args = parser.parse_args(argv)
    try:
        expected = load_base_hashes(args.expect) if args.expect else None
        if args.update is None:
            if expected is None or args.out:
                parser.error("without --update: give --expect (and no --out) to check --base")
            check_base_hashes(args.base, expected)
            print(f"{PROG}: {args.base} matches {args.expect}")
            return 0
        if not args.out:
            parser.error("--update needs --out")
        outcome = merge_stacked_update(args.base, args.update, args.out, expected=expected)
    except REFUSALS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    what = "kept (already merged)" if outcome.reused else f"merged in {outcome.seconds:.1f} s"
    print(f"{PROG}: {args.out}: {what}, matches the canonical base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
