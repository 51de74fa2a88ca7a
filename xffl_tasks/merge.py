"""``python -m xffl_tasks.merge --base DIR --adapter DIR --out DIR``: a LoRA adapter merged into
its base model, as a plain Hugging Face folder that ``from_pretrained`` loads without PEFT.

Every adapted weight becomes ``W + scaling * B @ A`` (computed in float32, float64 for F64,
rounded once to W's dtype); every other tensor is copied byte for byte. The output keeps the
base's layout exactly: the same shard files, each with the base's header verbatim (same names,
dtypes, shapes and offsets), the same index, config, generation config and tokenizer. It
streams one tensor at a time (memory: the largest tensor, plus one adapted layer in float32),
writes into a hidden folder beside ``--out``, fsyncs, and renames it into place only complete.
Exit status 0; 2 on bad input (one line on stderr, ``xffl-merge: error: ...``); 1 on I/O errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROG = "xffl-merge"


class MergeError(ValueError):
    """The inputs cannot be merged; the message names the folder and the tensor."""


def _adapter(adapter: Path):
    import torch
    from safetensors.torch import load_file

    from xffl_tasks.adapter import ADAPTER_WEIGHTS, AdapterError, lora_pairs, read_adapter_config

    try:
        settings = read_adapter_config(adapter)
        if not (adapter / ADAPTER_WEIGHTS).is_file():
            raise MergeError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS}")
        tensors = load_file(str(adapter / ADAPTER_WEIGHTS))  # small: the adapter alone
        pairs = lora_pairs(tensors)
    except AdapterError as error:
        raise MergeError(f"--adapter {adapter}: {error}") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise MergeError(f"--adapter {adapter}: tensor {name!r} holds NaN or Inf")
    return settings, {
        f"{module}.weight": (tensors[a], tensors[b]) for module, (a, b) in pairs.items()
    }


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """Writes ``base`` with ``adapter`` merged into ``out`` (which must not exist)."""
    import torch

    from xffl_tasks.aggregate.errors import AggregationError
    from xffl_tasks.aggregate.model_folder import open_model_folder

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if os.path.lexists(out):
        raise MergeError(f"--out {out}: already exists")
    try:
        folder = open_model_folder(base, label=f"--base {base}")
    except AggregationError as error:
        raise MergeError(str(error)) from None
    settings, layers = _adapter(adapter)
    missing = sorted(set(layers) - set(folder.tensors))
    if missing:
        raise MergeError(f"--adapter {adapter}: adapts {missing[0]!r}, which --base {base} lacks")
    for name, (a, b) in layers.items():
        shape = folder.tensors[name].entry.shape
        if (
            len(shape) != 2
            or tuple(b.shape) != (shape[0], settings.r)
            or tuple(a.shape) != (settings.r, shape[1])
        ):
            raise MergeError(
                f"--adapter {adapter}: {name}: B {list(b.shape)} @ A {list(a.shape)} does not fit the base's {list(shape)}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for shard in folder.shards:
            with open(shard.path, "rb") as source, open(staging / shard.file, "wb") as target:
                target.write(shard.header.header_bytes)  # same tensors, same offsets
                for entry in shard.header.tensors:
                    raw = os.pread(
                        source.fileno(), entry.nbytes, shard.header.data_start + entry.begin
                    )
                    if len(raw) != entry.nbytes:
                        raise MergeError(
                            f"--base {base}: {shard.file} is truncated at {entry.name!r}"
                        )
                    if entry.name in layers:
                        a, b = layers[entry.name]
                        weight = torch.frombuffer(bytearray(raw), dtype=entry.dtype.torch).view(
                            entry.shape
                        )
                        compute = entry.dtype.compute
                        merged = weight.to(compute) + settings.scaling * (
                            b.to(compute) @ a.to(compute)
                        )
                        raw = (
                            merged.to(entry.dtype.torch)
                            .contiguous()
                            .view(torch.uint8)
                            .numpy()
                            .tobytes()
                        )
                    target.write(raw)
                target.flush()
                os.fsync(target.fileno())
        written = {shard.file for shard in folder.shards}
        for path in sorted(base.iterdir()):
            if path.is_file() and path.name not in written:
                shutil.copyfile(path, staging / path.name)
        for path in [staging, *staging.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(staging, out)  # out was absent: never replaces anything but a race
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model folder (safetensors)")
    parser.add_argument("--adapter", required=True, help="the PEFT LoRA adapter folder")
    parser.add_argument("--out", required=True, help="the merged model's folder (must not exist)")
    args = parser.parse_args(argv)
    try:
        path = merge(Path(args.base), Path(args.adapter), Path(args.out))
    except MergeError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"{PROG}: merged {args.adapter} into {args.base}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
