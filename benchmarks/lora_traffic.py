"""What LoRA saves per round, and what aggregating adapters costs.

    python benchmarks/lora_traffic.py [--json] [--clients 4] [--rank 16]

1. Bytes per round per facility, full fine-tuning against a LoRA adapter, for LLaMA-2-7B's
   shapes (a transformers ``LlamaConfig`` built on the meta device: no weights, no download)
   and for the tiny model (``xffl_tasks.tiny``'s default spec). Full fine-tuning pushes and
   pulls the whole model every round (bf16 for 7B, as its checkpoint is; float32 for the tiny
   model); a LoRA round pushes and pulls the adapter (float32, r on q, k, v, o projections),
   after a one-off push of the base model.
2. Aggregating ``--clients`` adapters of the 7B shapes at ``--rank`` with each adapter strategy
   (``aggregate()`` end to end: checks, sha256 of every file, the arithmetic, the write), each
   in a child process: wall seconds and peak anonymous memory (``RssAnon``, sampled every 2 ms).
3. ``lora-stacked`` at ``--stacked-facilities`` (2, 4, 8) facilities of rank ``--rank``: bytes
   per round per facility for the 7B shapes (the stacked update pushed, computed exactly from
   the shapes, its JSON with a real record of the 7B tensors; the facility's adapter pulled),
   and the seconds of the aggregation (stack, canonical merge, hashes, write) and of a
   facility's merge (``merge_stacked_update``: merge, hashes, checks). Those run on a bf16 base
   of the 7B shapes cut to ``--stacked-layers`` decoder layers (1 and 4 by default: the full 13.5
   GB base does not fit this machine's disk budget and time), each in a child process, the fastest
   of ``--stacked-repeats`` runs, and are extrapolated to 32 layers as ``t(1) + 31 (t(4) -
   t(1)) / 3`` (the embeddings and the head once, then each layer alike).
Prints one JSON line with ``--json``, else a table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class _Skip(Exception):
    """--stacked-only: the other strategies' timings are skipped."""


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied: counted once


def llama2_7b():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip


def tiny():
    from transformers import LlamaConfig

    from xffl_tasks.tiny.model import TinyModelSpec

    spec = TinyModelSpec()
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, tie_word_embeddings=True,
    )  # fmt: skip


def traffic(shapes: dict[str, tuple[int, ...]], *, model_bytes_per_element: int, rank: int) -> dict:
    from xffl_tasks.adapter import LoraSettings, target_weights

    full = sum(math.prod(s) for s in shapes.values()) * model_bytes_per_element
    modules = target_weights(shapes, LoraSettings(r=rank, target_modules=TARGETS))
    adapter_elements = sum(rank * (rows + columns) for rows, columns in modules.values())
    adapter = adapter_elements * 4
    return {
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "adapter_parameters": adapter_elements,
        "full_push_bytes": full,
        "full_pull_bytes": full,
        "full_round_bytes": 2 * full,
        "lora_base_push_once_bytes": full,
        "lora_push_bytes": adapter,
        "lora_pull_bytes": adapter,
        "lora_round_bytes": 2 * adapter,
        "ratio_full_to_lora": (2 * full) / (2 * adapter),
    }


def make_adapters(folder: Path, shapes, clients: int, rank: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    from xffl_tasks.adapter import LoraSettings, adapter_key, target_weights, write_adapter_config

    settings = LoraSettings(r=rank, target_modules=TARGETS)
    modules = target_weights(shapes, settings)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(clients + 1):
        tensors = {}
        for module, (rows, columns) in modules.items():
            tensors[adapter_key(module, "A")] = torch.randn(rank, columns, generator=generator) / 64
            tensors[adapter_key(module, "B")] = torch.randn(rows, rank, generator=generator) / 64
        path = folder / ("previous" if index == 0 else f"client{index}")
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_adapter_config(path, settings)
        if index:
            (path / "metrics.json").write_text(json.dumps({"num_samples": 100 * index}))
        paths.append(path)
    return paths[0], paths[1:]


def _child(strategy: str, previous: str, clients: list[str], out: str, queue) -> None:
    from xffl_tasks.aggregate import aggregate

    started = time.perf_counter()
    report = aggregate(Path(previous), [Path(c) for c in clients], Path(out), strategy=strategy)
    queue.put(
        {"seconds": time.perf_counter() - started, "max_residual": report.get("max_residual")}
    )


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_in_child(target, args: tuple, failed: str) -> tuple[dict, int]:
    """Runs ``target(*args, queue)`` in a spawned process; its result and its peak anonymous
    RSS in bytes (sampled every 2 ms). ``failed`` names the work in the error if it fails."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    peak = 0
    while child.is_alive():
        peak = max(peak, _rss_anon(child.pid))
        time.sleep(0.002)
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{failed} (exit {child.exitcode})")
    return queue.get(), peak


def time_strategy(strategy: str, previous: Path, clients: list[Path], out: Path) -> dict:
    args = (strategy, str(previous), [str(c) for c in clients], str(out))
    result, peak = run_in_child(_child, args, f"{strategy}: the aggregation failed")
    return {
        "seconds": round(result["seconds"], 3),
        "peak_anon_mb": round(peak / 2**20, 1),
        "max_residual": result["max_residual"],
    }


def stacked_traffic(shapes: dict[str, tuple[int, ...]], facilities: int, rank: int) -> dict:
    """Bytes per round per facility under lora-stacked, for ``facilities`` adapters of ``rank``:
    the stacked update pushed (factors, safetensors header, JSON with the base's and the
    result's per-tensor record) and the facility's own adapter pulled."""
    from xffl_tasks.adapter import LoraSettings, target_weights
    from xffl_tasks.aggregate.safetensors_format import DTYPES, build_header
    from xffl_tasks.base_hashes import BaseHashes, TensorHash
    from xffl_tasks.stacked_update import StackedClient, StackedModule, StackedUpdate

    modules = target_weights(shapes, LoraSettings(r=rank, target_modules=TARGETS))
    adapter = sum(rank * (rows + columns) for rows, columns in modules.values()) * 4
    names = [f"f{i}" for i in range(facilities)]
    digest = "0" * 64
    files = {"model-00001-of-00002.safetensors": digest, "model-00002-of-00002.safetensors": digest,
             "model.safetensors.index.json": digest, "config.json": digest}  # fmt: skip
    record = BaseHashes(files, {
        name: TensorHash("model-00001-of-00002.safetensors", "BF16", shape, digest)
        for name, shape in shapes.items()
    })  # fmt: skip
    update = StackedUpdate(
        tuple(StackedClient(n, rank, 2.0 * rank, 1 / facilities, 2.0 / facilities) for n in names),
        {m: StackedModule(m, shape, tuple(names), rank * facilities) for m, shape in modules.items()},
        1.0, {}, record, record, digest,
    )  # fmt: skip
    description = len((json.dumps(update.describe(), indent=1) + "\n").encode())
    k = rank * facilities
    header = len(build_header(
        [spec for m, (rows, columns) in sorted(modules.items())
         for spec in ((f"{m}.stacked_A", DTYPES["F32"], (k, columns)), (f"{m}.stacked_B", DTYPES["F32"], (rows, k)))],
        {"format": "pt"},
    ).header_bytes)  # fmt: skip
    push = facilities * adapter + header + description
    return {
        "facilities": facilities,
        "push_bytes": push,
        "push_json_bytes": description,
        "pull_bytes": adapter,
        "round_bytes": push + adapter,
        "lora_svd_round_bytes": 2 * adapter,
    }


def cut_to_layers(shapes: dict[str, tuple[int, ...]], layers: int) -> dict[str, tuple[int, ...]]:
    keep = {f"model.layers.{i}." for i in range(layers)}
    return {
        name: shape for name, shape in shapes.items()
        if not name.startswith("model.layers.") or any(name.startswith(k) for k in keep)
    }  # fmt: skip


def make_base(folder: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A bf16 model folder of ``shapes`` (random weights, 2 GB shards, an index)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor = (torch.rand(shape, generator=generator, dtype=torch.float32) - 0.5).to(torch.bfloat16) / 16
        if size + tensor.numel() * 2 > 2 << 30 and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * 2
    weight_map = {}
    for index, tensors in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def make_stacked_clients(folder: Path, base_shapes, facilities: int, rank: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    from xffl_tasks.adapter import LoraSettings, adapter_key, target_weights, write_adapter_config

    settings = LoraSettings(r=rank, alpha=2.0 * rank, target_modules=TARGETS)
    modules = target_weights(base_shapes, settings)
    generator = torch.Generator().manual_seed(1)
    paths = []
    for index in range(facilities):
        tensors = {}
        for module, (rows, columns) in modules.items():
            tensors[adapter_key(module, "A")] = torch.randn(rank, columns, generator=generator) / 64
            tensors[adapter_key(module, "B")] = torch.randn(rows, rank, generator=generator) / 64
        path = folder / f"facility{index}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_adapter_config(path, settings)
        (path / "metrics.json").write_text(json.dumps({"num_samples": 100 * (index + 1)}))
        paths.append(path)
    return paths


def _stacked_child(kind: str, base: str, inputs: list[str], out: str, queue) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    if kind == "aggregate":
        from xffl_tasks.aggregate import aggregate

        report = aggregate(Path(base), [Path(p) for p in inputs], Path(out), strategy="lora-stacked")
        extra = {"max_rounding_loss": report["merge"]["max_rounding_loss"], "stacked_rank": report["adapter"]["stacked_rank"]}
    else:
        from xffl_tasks.stacked_merge import merge_stacked_update

        merge_stacked_update(Path(base), Path(inputs[0]), Path(out))
        extra = {}
    queue.put({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, **extra})


def _in_child(kind: str, base: Path, inputs: list[Path], out: Path) -> dict:
    args = (kind, str(base), [str(p) for p in inputs], str(out))
    result, peak = run_in_child(_stacked_child, args, f"lora-stacked {kind} failed")
    result["seconds"] = round(result["seconds"], 3)
    result["cpu_seconds"] = round(result["cpu_seconds"], 3)
    result["peak_anon_mb"] = round(peak / 2**20, 1)
    return result


def _best(kind: str, base: Path, inputs: list[Path], out: Path, repeats: int) -> dict:
    """The fastest of ``repeats`` runs (the least disturbed by other work on the machine)."""
    runs = []
    for _ in range(repeats):
        runs.append(_in_child(kind, base, inputs, out))
        if _ < repeats - 1:
            shutil.rmtree(out)
    best = min(runs, key=lambda run: run["seconds"])
    best["runs_seconds"] = [run["seconds"] for run in runs]
    return best


def stacked_timings(big, facilities: list[int], rank: int, layers: list[int], repeats: int = 2) -> dict:
    """Aggregation and facility-merge seconds at each cut of the 7B shapes (the fastest of
    ``repeats`` runs), extrapolated to 32 layers from the two smallest cuts."""
    results: dict = {str(n): {"aggregate": {}, "facility_merge": {}} for n in facilities}
    for count in layers:
        work = Path(tempfile.mkdtemp(prefix="lora-stacked-bench-"))
        try:
            shapes = cut_to_layers(big, count)
            base = make_base(work / "base", shapes)
            for n in facilities:
                (work / f"clients{n}").mkdir()
                clients = make_stacked_clients(work / f"clients{n}", shapes, n, rank)
                out = work / f"out{n}"
                results[str(n)]["aggregate"][f"{count}_layers"] = _best("aggregate", base, clients, out, repeats)
                merged = work / f"merged{n}"
                results[str(n)]["facility_merge"][f"{count}_layers"] = _best(
                    "merge", base, [out / "stacked_update"], merged, repeats
                )
                shutil.rmtree(out)
                shutil.rmtree(merged)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if len(layers) >= 2:
        low, high = sorted(layers)[:2]
        for entry in results.values():
            for phase in ("aggregate", "facility_merge"):
                t_low = entry[phase][f"{low}_layers"]["seconds"]
                t_high = entry[phase][f"{high}_layers"]["seconds"]
                per_layer = (t_high - t_low) / (high - low)
                entry[phase]["per_layer_seconds"] = round(per_layer, 2)
                # a slope at or below zero is noise from other work on the machine: no figure
                entry[phase]["32_layers_extrapolated_seconds"] = (
                    round(t_low + (32 - low) * per_layer, 1) if per_layer > 0 else None
                )
                c_low = entry[phase][f"{low}_layers"]["cpu_seconds"]
                c_high = entry[phase][f"{high}_layers"]["cpu_seconds"]
                cpu_per_layer = (c_high - c_low) / (high - low)
                entry[phase]["32_layers_extrapolated_cpu_seconds"] = (
                    round(c_low + (32 - low) * cpu_per_layer, 1) if cpu_per_layer > 0 else None
                )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny-rank", type=int, default=8)
    parser.add_argument("--stacked-facilities", default="2,4,8", help="facility counts for lora-stacked")
    parser.add_argument("--stacked-layers", default="1,4", help="decoder layers of the cut 7B base (of 32)")
    parser.add_argument("--stacked-repeats", type=int, default=2, help="runs of each timing (the fastest counts)")
    parser.add_argument("--stacked-only", action="store_true", help="skip the other strategies' timings")
    args = parser.parse_args(argv)
    stacked_counts = [int(x) for x in args.stacked_facilities.split(",")]
    stacked_layers = [int(x) for x in args.stacked_layers.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    big = shapes_of(llama2_7b())
    result = {
        "llama2_7b": traffic(big, model_bytes_per_element=2, rank=args.rank),
        "tiny": traffic(shapes_of(tiny()), model_bytes_per_element=4, rank=args.tiny_rank),
        "rank": args.rank,
        "tiny_rank": args.tiny_rank,
        "aggregation": {
            "clients": args.clients,
            "shapes": "llama2_7b",
            "rank": args.rank,
            "strategies": {},
        },
    }
    result["lora_stacked"] = {
        "shapes": "llama2_7b",
        "rank": args.rank,
        "alpha": 2.0 * args.rank,
        "base_dtype": "bf16",
        "traffic": {str(n): stacked_traffic(big, n, args.rank) for n in stacked_counts},
        "timings_base": (
            f"the 7B shapes cut to {stacked_layers} of 32 decoder layers (embeddings and head "
            f"whole), bf16, the fastest of {args.stacked_repeats} runs; seconds extrapolated to 32 "
            "layers as t(low) + (32 - low) * per-layer"
        ),
        "cpu_threads": 1,
        "timings": stacked_timings(big, stacked_counts, args.rank, stacked_layers, args.stacked_repeats),
        "load_average_after": os.getloadavg()[0],
    }
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    try:
        if args.stacked_only:
            raise _Skip
        previous, clients = make_adapters(work, big, args.clients, args.rank)
        # lora-frozen-a needs every client to hold the round's A: copy it in
        frozen = []
        for client in clients:
            target = work / f"frozen-{client.name}"
            shutil.copytree(client, target)
            from safetensors.torch import load_file, save_file

            mine, theirs = (
                load_file(str(previous / "adapter_model.safetensors")),
                load_file(str(target / "adapter_model.safetensors")),
            )
            save_file(
                {k: (mine[k] if ".lora_A." in k else v) for k, v in theirs.items()},
                str(target / "adapter_model.safetensors"),
            )
            frozen.append(target)
        for strategy in ("lora-fedavg", "lora-svd", "lora-frozen-a"):
            inputs = frozen if strategy == "lora-frozen-a" else clients
            result["aggregation"]["strategies"][strategy] = time_strategy(
                strategy, previous, inputs, work / f"out-{strategy}"
            )
    except _Skip:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("llama2_7b", "tiny"):
            t = result[name]
            print(f"{name}: full {t['full_round_bytes'] / 1e6:.3f} MB/round, LoRA {t['lora_round_bytes'] / 1e6:.3f} MB/round "
                  f"(x{t['ratio_full_to_lora']:.0f} less; base {t['lora_base_push_once_bytes'] / 1e6:.1f} MB once)")  # fmt: skip
        for strategy, figures in result["aggregation"]["strategies"].items():
            print(f"{strategy}: {figures['seconds']} s, peak anon {figures['peak_anon_mb']} MiB")
        for n, t in result["lora_stacked"]["traffic"].items():
            times = result["lora_stacked"]["timings"][n]
            print(f"lora-stacked, {n} facilities: {t['round_bytes'] / 1e6:.1f} MB/round/facility "
                  f"(push {t['push_bytes'] / 1e6:.1f}, pull {t['pull_bytes'] / 1e6:.1f}; lora-svd "
                  f"{t['lora_svd_round_bytes'] / 1e6:.1f}); aggregation ~{times['aggregate'].get('32_layers_extrapolated_seconds')} s, "
                  f"facility merge ~{times['facility_merge'].get('32_layers_extrapolated_seconds')} s at 32 layers")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
