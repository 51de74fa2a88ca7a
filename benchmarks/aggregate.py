"""Benchmark: the streaming aggregation against the read floor and the naive way, in one run.

    python benchmarks/aggregate.py --clients 4 --model-mb 1024 --json

Builds synthetic bf16 checkpoints with llama-like tensor shapes in a temporary folder (deleted
at the end): the previous global model sharded in three files, as a Hub model is; each client a
single ``model.safetensors`` plus ``metrics.json``, as transformers 5's ``save_pretrained``
writes it (default shard size 50 GB). ``--client-layout same`` gives clients the previous
model's shards instead. Then, with the page cache warm, each contender runs in a child process:

- floor: read every input file once into one 128 KiB buffer (what ``cat`` to /dev/null does);
- hash floor: sha256 of every input file, two files at a time on two threads: the least that
  any aggregation hashing its inputs (as ``aggregation.json`` requires) spends;
- naive: safetensors ``load_file`` for every client, a float32 weighted sum, ``save_file``;
- ours: ``xffl_tasks.aggregate.aggregate`` (fedavg), sha256 of every file and the statistics
  included;
- ours with the inputs' hashes given (``input_hashes``, as the federation passes the pull's):
  only the output is hashed, every input is read once;
- ours unhashed, for information: the same with sha256 made a no-op, i.e. the streaming
  engine's own cost;
- two physical floors, for information: ``add_floor`` (one fused pass over memory: a float32
  accumulator that torch's ``add_`` on two threads fills from in-memory bf16 copies of the
  previous model and each client, then rounds to bf16: what the arithmetic costs at memory
  speed, without reading files), and ``write_floor`` (writing a model-sized file and fsyncing
  it, as the output must be).

Seconds (wall clock, and CPU seconds of all the child's threads) are measured inside the child
around the work only, not the interpreter's start or the imports; the best of ``--repeat``
runs is kept, every run is listed, and the median of each is given beside it (the machine is
shared: medians of interleaved repeats are the steadier figures). The modules, numba's kernels
included, are imported before the clock starts. Peak anonymous memory is the highest
``RssAnon`` of the child's ``/proc/<pid>/status``, sampled by this process every two milliseconds: heap and
buffers, not the file pages that mmap or the page cache hold (``VmRSS``, which counts those
too, is reported beside it). Prints one JSON line; the machine may be shared: its load average
before and after is in the line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, KV_DIM = 2048, 5632, 256
BF16_BYTES = 2


def llama_like_shapes(model_mb: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a llama-like model (tied embeddings) of about ``model_mb`` MiB in bf16.

    Hidden size 2048, intermediate 5632, 4 key-value heads of 64 (TinyLlama's shapes); the
    number of layers and then the vocabulary are sized to reach the target.
    """
    target = model_mb * 2**20 // BF16_BYTES
    layer = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    per_layer = sum(math.prod(shape) for shape in layer.values())
    layers = max(1, (target - 8000 * HIDDEN) // per_layer)
    vocab = max(8000, (target - layers * per_layer - HIDDEN) // HIDDEN)
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for index in range(layers):
        shapes.update({f"model.layers.{index}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def shard_plan(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Splits the tensors, in model order, into ``shards`` runs of about equal size."""
    total = sum(math.prod(s) for s in shapes.values())
    plan, current, size = [], [], 0
    for name, shape in shapes.items():
        if current and size + math.prod(shape) > total / shards * (len(plan) + 1):
            plan.append(current)
            current = []
        current.append(name)
        size += math.prod(shape)
    return [*plan, current]


def save_model(folder: Path, tensors: dict, plan: list[list[str]]) -> None:
    """Saves like ``save_pretrained``: one file, or shards and an index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    if len(plan) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, names in enumerate(plan, 1):
        file = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoints(root: Path, *, clients: int, model_mb: int, client_layout: str) -> dict:
    """The previous model and the clients under ``root``; returns the spec the children read."""
    import torch

    shapes = llama_like_shapes(model_mb)
    generator = torch.Generator().manual_seed(0)
    previous = {
        name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    previous_plan = shard_plan(shapes, 3)
    save_model(root / "previous", previous, previous_plan)
    client_plan = previous_plan if client_layout == "same" else [list(shapes)]
    folders = []
    for index in range(clients):
        folder = root / f"client{index}"
        client = {}
        for name, tensor in previous.items():
            noise = torch.randn(tensor.shape, generator=generator).mul_(1e-3 * (index + 1))
            client[name] = noise.add_(tensor).to(torch.bfloat16)
            del noise
        save_model(folder, client, client_plan)
        del client
        (folder / "metrics.json").write_text(
            json.dumps({"num_samples": 1000 * (index + 1), "num_tokens": 0})
        )
        folders.append(str(folder))
    size = sum(p.stat().st_size for p in (root / "previous").glob("*.safetensors"))
    spec = {
        "previous": str(root / "previous"),
        "clients": folders,
        "weights": [1000.0 * (i + 1) for i in range(clients)],
        "model_bytes": size,
        "elements": sum(math.prod(shape) for shape in shapes.values()),
        "input_hashes": str(root / "input-hashes.json"),
    }
    write_input_hashes(spec)
    return spec


def write_input_hashes(spec: dict) -> None:
    """What a transfer that verified every input would hand over: ``--input-hashes``'s JSON."""
    entries = {}
    for path in input_files(spec):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as file:
            while block := file.read(8 << 20):
                digest.update(block)
        stat = path.stat()
        entries[str(path)] = {
            "sha256": digest.hexdigest(),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
    Path(spec["input_hashes"]).write_text(json.dumps(entries, indent=1))


# The contenders, each run in a child process: `python benchmarks/aggregate.py --child NAME SPEC OUT`.


def input_files(spec: dict) -> list[Path]:
    return [
        p for folder in [spec["previous"], *spec["clients"]] for p in sorted(Path(folder).iterdir())
    ]


def child_floor(spec: dict, out: Path) -> None:
    buffer = bytearray(128 << 10)  # cat's buffer size
    for path in input_files(spec):
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def child_hash_floor(spec: dict, out: Path) -> None:
    """sha256 of every input, on two threads: what any aggregation that hashes its inputs
    spends at least (before any arithmetic, and before hashing its output)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def digest(path: Path) -> str:
        sha, buffer = hashlib.sha256(), bytearray(1 << 20)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                sha.update(view[:count])
        return sha.hexdigest()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(digest, sorted(input_files(spec), key=lambda p: -p.stat().st_size)))


def child_naive(spec: dict, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    total = sum(spec["weights"])
    accumulator: dict[str, torch.Tensor] = {}
    for folder, weight in zip(spec["clients"], spec["weights"]):
        state = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(path))
        for name, tensor in state.items():
            if name not in accumulator:
                accumulator[name] = torch.zeros(tensor.shape, dtype=torch.float32)
            accumulator[name].add_(tensor, alpha=weight / total)
        del state
    out.mkdir()
    save_file(
        {n: t.to(torch.bfloat16) for n, t in accumulator.items()}, str(out / "model.safetensors")
    )


def child_ours(spec: dict, out: Path) -> None:
    from xffl_tasks.aggregate import aggregate

    aggregate(Path(spec["previous"]), [Path(c) for c in spec["clients"]], out)


def child_ours_given_hashes(spec: dict, out: Path) -> None:
    from xffl_tasks.aggregate import aggregate

    given = json.loads(Path(spec["input_hashes"]).read_text())
    report = aggregate(
        Path(spec["previous"]), [Path(c) for c in spec["clients"]], out, input_hashes=given
    )
    # the previous model's small files are hashed anyway, as they are copied
    folders = [report["previous_hash_sources"]] + [c["hash_sources"] for c in report["clients"]]
    hashed = [
        name
        for sources in folders
        for name, source in sources.items()
        if source != "given" and name.endswith(".safetensors")
    ]
    if hashed or report["input_hashes"]["stale"]:
        raise SystemExit(f"benchmark: inputs hashed although given: {report['input_hashes']}")


def child_add_floor(spec: dict, out: Path) -> None:
    """One fused pass at memory speed: bf16 sources (64 MiB each, cycled, so that they come from
    memory, not the caches) added into a float32 accumulator by torch, rounded to bf16; as
    many elements as the model has, once per source; two threads (torch on one thread each,
    as ours runs it; its own thread pool spins badly on a loaded machine)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    torch.set_num_threads(1)
    block, step = 32 << 20, 1 << 20
    sources = [
        torch.randn(block, dtype=torch.float32).to(torch.bfloat16)
        for _ in range(1 + len(spec["clients"]))
    ]
    accumulators = [torch.empty(step, dtype=torch.float32) for _ in range(2)]
    rounded = [torch.empty(step, dtype=torch.bfloat16) for _ in range(2)]
    weight = 1.0 / len(spec["clients"])

    def half(which: int) -> None:
        accumulator, result = accumulators[which], rounded[which]
        for first in range(which * step, spec["elements"], 2 * step):
            count = min(step, spec["elements"] - first)
            at = first % (block - step)
            accumulator[:count].copy_(sources[0][at : at + count])
            for source in sources[1:]:
                accumulator[:count].add_(source[at : at + count], alpha=weight)
            result[:count].copy_(accumulator[:count])

    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(half, range(2)))
    out.mkdir()
    (out / "seconds").write_text(str(time.perf_counter() - started))


def child_write_floor(spec: dict, out: Path) -> None:
    """Writing a model-sized file from one 8 MiB buffer and fsyncing it."""
    out.mkdir()
    buffer = os.urandom(8 << 20)
    with open(out / "model.bin", "wb", buffering=0) as file:
        left = spec["model_bytes"]
        while left > 0:
            left -= file.write(memoryview(buffer)[: min(left, len(buffer))])
        os.fsync(file.fileno())


def child_ours_unhashed(spec: dict, out: Path) -> None:
    """Ours with sha256 made a no-op, for information only: the streaming engine's own cost
    (its aggregation.json then holds dummy hashes)."""
    import types

    from xffl_tasks.aggregate import files

    class NoHash:
        def __init__(self, data: bytes = b"") -> None:
            pass

        def update(self, data) -> None:
            pass

        def hexdigest(self) -> str:
            return "0" * 64

    files.hashlib = types.SimpleNamespace(sha256=NoHash)
    child_ours(spec, out)


CONTENDERS = {
    "floor": child_floor,
    "hash_floor": child_hash_floor,
    "naive": child_naive,
    "ours": child_ours,
    "ours_given_hashes": child_ours_given_hashes,
    "ours_unhashed": child_ours_unhashed,
    "add_floor": child_add_floor,
    "write_floor": child_write_floor,
}


def child_main(name: str, spec_path: str, out: str) -> None:
    import torch  # imported before the clock starts, by every contender alike

    del torch
    import xffl_tasks.aggregate.aggregation  # noqa: F401 (and numba's kernels, compiled or cached)

    spec = json.loads(Path(spec_path).read_text())
    started, cpu_started = time.perf_counter(), time.process_time()
    CONTENDERS[name](spec, Path(out))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if name == "add_floor":  # the sources' set-up is not part of it
        seconds = float((Path(out) / "seconds").read_text())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}))


def memory_kib(pid: int) -> tuple[int, int]:
    """The process's RssAnon and VmRSS (anonymous plus file pages mapped), in KiB."""
    values = {"RssAnon:": 0, "VmRSS:": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(maxsplit=1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["RssAnon:"], values["VmRSS:"]


def run_child(name: str, spec_path: Path, out: Path) -> tuple[dict, float, float]:
    """Runs one contender; returns its timings (seconds, CPU seconds of all its threads),
    its peak RssAnon and its peak VmRSS in MiB."""
    command = [sys.executable, __file__, "--child", name, str(spec_path), str(out)]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(command, stdout=stdout, env=env, cwd=REPO)
        peak_anon = peak_rss = 0
        while process.poll() is None:
            anon, rss = memory_kib(process.pid)
            peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
            time.sleep(0.002)
        stdout.seek(0)
        text = stdout.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"benchmark: {name} failed with status {process.returncode}")
    return json.loads(text.strip().splitlines()[-1]), peak_anon / 1024, peak_rss / 1024


def compare_outputs(ours: Path, naive: Path) -> dict:
    """Tensor by tensor: how many elements of ours and naive's outputs differ, and by how much."""
    from safetensors import safe_open

    naive_file = safe_open(str(naive / "model.safetensors"), "pt")
    differing, worst, elements = 0, 0.0, 0
    for path in sorted(ours.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as file:
            for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                a, b = file.get_tensor(name).float(), naive_file.get_tensor(name).float()
                differing += int((a != b).sum())
                worst = max(worst, float((a - b).abs().max()))
                elements += a.numel()
    return {"elements": elements, "differing_elements": differing, "max_abs_difference": worst}


def targets(seconds: dict[str, float], peaks: dict[str, float]) -> dict[str, bool]:
    """The issue's targets, met or not."""
    return {
        "ours_given_hashes <= 3 floor": seconds["ours_given_hashes"] <= 3 * seconds["floor"],
        "ours <= 1.5 hash_floor": seconds["ours"] <= 1.5 * seconds["hash_floor"],
        "ours peak anon <= 256 MiB": max(peaks["ours"], peaks["ours_given_hashes"]) <= 256,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model-mb", type=int, default=1024)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per contender; the best is kept"
    )
    parser.add_argument("--client-layout", choices=["single", "same"], default="single")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    workdir = Path(args.workdir or tempfile.gettempdir())
    needed = (args.clients + 3) * args.model_mb * 2**20 * 1.1
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise SystemExit(
            f"benchmark: {workdir} has {free >> 20} MiB free, {int(needed) >> 20} MiB needed"
        )
    root = Path(tempfile.mkdtemp(prefix="xffl-aggregate-bench.", dir=workdir))
    try:
        say(f"building {args.clients} clients of {args.model_mb} MiB in {root}")
        spec = build_checkpoints(
            root, clients=args.clients, model_mb=args.model_mb, client_layout=args.client_layout
        )
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        load_before = os.getloadavg()[0]
        run_child("floor", spec_path, root / "warm")  # warms the page cache
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        cpu: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        peaks: dict[str, float] = dict.fromkeys(CONTENDERS, 0.0)
        peaks_rss: dict[str, float] = dict.fromkeys(CONTENDERS, 0.0)
        for repeat in range(args.repeat):
            for name in CONTENDERS:
                out = root / f"out-{name}"
                timing, peak, peak_rss = run_child(name, spec_path, out)
                seconds = timing["seconds"]
                cpu[name].append(timing["cpu_seconds"])
                say(
                    f"{name}: {seconds:.2f} s ({timing['cpu_seconds']:.2f} s of CPU), "
                    f"peak RssAnon {peak:.0f} MiB, VmRSS {peak_rss:.0f} MiB"
                )
                peaks_rss[name] = max(peaks_rss[name], peak_rss)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
                if repeat < args.repeat - 1 or name not in ("naive", "ours"):
                    shutil.rmtree(out, ignore_errors=True)
        agreement = compare_outputs(root / "out-ours", root / "out-naive")
        best = {name: min(values) for name, values in times.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        result = {
            "benchmark": "aggregate",
            "strategy": "fedavg",
            "clients": args.clients,
            "model_mb": round(spec["model_bytes"] / 2**20),
            "client_layout": args.client_layout,
            "input_bytes": sum(
                p.stat().st_size
                for f in [spec["previous"], *spec["clients"]]
                for p in Path(f).iterdir()
            ),
            "floor_s": round(best["floor"], 3),
            "hash_floor_s": round(best["hash_floor"], 3),
            "naive_s": round(best["naive"], 3),
            "ours_s": round(best["ours"], 3),
            "ours_given_hashes_s": round(best["ours_given_hashes"], 3),
            "ours_unhashed_s": round(best["ours_unhashed"], 3),
            "add_floor_s": round(best["add_floor"], 3),
            "write_floor_s": round(best["write_floor"], 3),
            "ours_over_floor": round(best["ours"] / best["floor"], 2),
            "naive_over_floor": round(best["naive"] / best["floor"], 2),
            "hash_floor_over_floor": round(best["hash_floor"] / best["floor"], 2),
            "ours_over_hash_floor": round(best["ours"] / best["hash_floor"], 2),
            "ours_unhashed_over_floor": round(best["ours_unhashed"] / best["floor"], 2),
            "ours_given_hashes_over_floor": round(best["ours_given_hashes"] / best["floor"], 2),
            "targets": targets(best, peaks),
            "median_s": {name: round(value, 3) for name, value in median.items()},
            "targets_on_medians": targets(median, peaks),
            "ours_peak_anon_mb": round(peaks["ours"]),
            "ours_given_hashes_peak_anon_mb": round(peaks["ours_given_hashes"]),
            "naive_peak_anon_mb": round(peaks["naive"]),
            "floor_peak_anon_mb": round(peaks["floor"]),
            "ours_peak_rss_mb": round(peaks_rss["ours"]),
            "naive_peak_rss_mb": round(peaks_rss["naive"]),
            "runs_s": {name: [round(v, 3) for v in values] for name, values in times.items()},
            "cpu_s": {name: [round(v, 3) for v in values] for name, values in cpu.items()},
            "ours_vs_naive": agreement,
            "cpus": os.cpu_count(),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
