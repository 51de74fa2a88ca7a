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


def time_strategy(strategy: str, previous: Path, clients: list[Path], out: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=_child, args=(strategy, str(previous), [str(c) for c in clients], str(out), queue)
    )
    child.start()
    peak = 0
    while child.is_alive():
        peak = max(peak, _rss_anon(child.pid))
        time.sleep(0.002)
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{strategy}: the aggregation failed (exit {child.exitcode})")
    result = queue.get()
    return {
        "seconds": round(result["seconds"], 3),
        "peak_anon_mb": round(peak / 2**20, 1),
        "max_residual": result["max_residual"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny-rank", type=int, default=8)
    args = parser.parse_args(argv)
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
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    try:
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
        for strategy in ("lora-fedavg", "lora-exact", "lora-frozen-a"):
            inputs = frozen if strategy == "lora-frozen-a" else clients
            result["aggregation"]["strategies"][strategy] = time_strategy(
                strategy, previous, inputs, work / f"out-{strategy}"
            )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
