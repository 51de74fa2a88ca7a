"""Benchmark: DP-SGD training against plain training, and what privacy costs a federation.

    python benchmarks/privacy.py [--json] [--steps 20] [--round-steps 10] [--rounds 3]
                                 [--batch-size 8] [--seq-len 64] [--threads 2]

Makes the tiny model and its Italian and Czech corpora (``xffl_tasks.tiny``) in a temporary
folder (deleted at the end), then, each training in a child process of its own
(``xffl_tasks.train``'s ``run``, one process, fp32 on the CPU):

- throughput: plain and DP-SGD training of the same model on the same Italian sequences for
  the same number of steps, batch size, sequence length, learning rate and threads, full
  fine-tuning and a new LoRA adapter (r 8 on q, k, v, o). DP-SGD's logical batches are Poisson
  draws of ``batch_size`` sequences expected (noise multiplier 1, clipping norm 1), so its
  tokens are the ones actually drawn. Figures: tokens per second of the training loop (its own
  clock, first steps' warm-up included), tokens per second of the median step (steadier), DP's
  slowdown by each, and the child's peak RSS (``ru_maxrss``: the whole process, model and
  libraries included);
- federation: ``--rounds`` rounds of full fine-tuning by two facilities (Italian, Czech), each
  round ``--round-steps`` steps per facility from the global model (the two at once, one
  thread each), then
  ``xffl_tasks.aggregate.aggregate`` (FedAvg by num_samples) into the next global model, no
  Airflow. At epsilon infinity the facilities train plainly; at epsilon 8 and 1 each facility
  trains with DP-SGD and a fixed noise multiplier, chosen before the first round (Opacus's
  ``get_noise_multiplier``, RDP) so that its ``rounds x round_steps`` steps at its own sample
  rate end at that epsilon, delta 1/(10 N) (N its training sequences). The epsilon reached is
  then recomputed from the facilities' metrics.json by the aggregation side's accountant
  (``xffl_tasks.privacy``: ``params_from_metrics``, ``epsilon`` over the rounds). Figures: the
  global model's validation loss on each corpus's whole validation set (nats per token) before
  and after the rounds, their mean, and the peak RSS of the setting's training children.

Prints one JSON line; the machine may be shared: its load average before and after is in it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEARNING_RATE = 0.001
FACILITIES = ("italian", "czech")
TARGETS = (None, 8.0, 1.0)  # None: epsilon infinity, plain training


def child_train(spec: dict) -> dict:
    """One training run of ``spec`` (TrainingConfig fields); its metrics and peak RSS."""
    from xffl_tasks.train.config import TrainingConfig
    from xffl_tasks.train.recipe import run

    metrics = run(TrainingConfig(**spec), environ={})
    return {
        "seconds": metrics["seconds"],
        "tokens": metrics["num_tokens"],
        "steps": metrics["steps"],
        "step_seconds_median": metrics["step_seconds_median"],
        "train_loss": metrics.get("train_loss"),  # withheld by DP runs
        "privacy": metrics.get("privacy"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def launch(spec: dict) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               OMP_NUM_THREADS=str(spec["threads"]))  # fmt: skip
    return subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"training child failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def start(spec: dict) -> dict:
    return finish(launch(spec))


def base_spec(args: argparse.Namespace, model: Path, corpus: str, out: Path) -> dict:
    return {
        "model": str(model), "data": str(args.tiny / "data" / corpus), "out": str(out),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "learning_rate": LEARNING_RATE,
        "lr_schedule": "constant", "threads": args.threads, "precision": "fp32", "device": "cpu",
        "val_max_sequences": 16, "log_every": 10**6,
    }  # fmt: skip


def throughput(args: argparse.Namespace, say) -> dict:
    results: dict[str, dict] = {}
    for tuning in ("full", "lora"):
        for mode in ("plain", "dp"):
            out = args.work / f"throughput-{tuning}-{mode}"
            spec = base_spec(args, args.tiny / "model", "italian", out) | {"max_steps": args.steps}
            if tuning == "lora":
                spec["peft"] = "lora"
            if mode == "dp":
                spec |= {"dp_mode": "dp-sgd", "dp_noise_multiplier": 1.0}
            run = start(spec)
            shutil.rmtree(out, ignore_errors=True)
            results.setdefault(tuning, {})[mode] = {
                "tokens_per_second": round(run["tokens"] / run["seconds"], 1),
                "tokens_per_second_median_step": round(
                    run["tokens"] / run["steps"] / run["step_seconds_median"], 1
                ),
                "tokens": run["tokens"],
                "seconds": round(run["seconds"], 3),
                "peak_rss_mib": round(run["peak_rss_mib"], 1),
            }
            say(f"throughput {tuning} {mode}: {results[tuning][mode]}")
        plain, private = results[tuning]["plain"], results[tuning]["dp"]
        results[tuning]["dp_slowdown"] = round(
            plain["tokens_per_second"] / private["tokens_per_second"], 2
        )
        results[tuning]["dp_slowdown_median_step"] = round(
            plain["tokens_per_second_median_step"] / private["tokens_per_second_median_step"], 2
        )
    return results


def corpus_sizes(args: argparse.Namespace) -> dict[str, tuple[int, object]]:
    from transformers import AutoTokenizer

    from xffl_tasks.data.dataset import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(str(args.tiny / "model"), local_files_only=True)
    sizes = {}
    for corpus in FACILITIES:
        dataset = load_dataset(args.tiny / "data" / corpus, tokenizer=tokenizer, seq_len=args.seq_len)
        sizes[corpus] = (len(dataset.train), dataset.validation)
    return sizes


def validation_loss(model: Path, sizes: dict, args: argparse.Namespace) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from xffl_tasks.launch import resolve_launch
    from xffl_tasks.train.config import TrainingConfig
    from xffl_tasks.train.distributed import resolve_runtime
    from xffl_tasks.train.loop import evaluate

    loaded = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True)
    runtime = resolve_runtime(TrainingConfig(device="cpu"), resolve_launch({}))
    losses = {
        corpus: evaluate(loaded, validation, runtime, batch_size=16).loss
        for corpus, (_, validation) in sizes.items()
    }
    losses["mean"] = sum(losses.values()) / len(FACILITIES)
    return {k: round(v, 4) for k, v in losses.items()}


def federation(args: argparse.Namespace, say) -> dict:
    from xffl_tasks.aggregate import aggregate
    from xffl_tasks.privacy import epsilon, noise_for_epsilon, params_from_metrics
    from xffl_tasks.train.dp_options import default_delta

    sizes = corpus_sizes(args)
    results: dict[str, dict] = {}
    before = validation_loss(args.tiny / "model", sizes, args)
    for target in TARGETS:
        name = "inf" if target is None else f"{target:g}"
        noise = {}
        if target is not None:
            for corpus, (count, _) in sizes.items():
                noise[corpus] = noise_for_epsilon(
                    target, sample_rate=args.batch_size / count, delta=default_delta(count),
                    steps=args.rounds * args.round_steps,
                )  # fmt: skip
        global_model, peak, rounds = args.tiny / "model", 0.0, {c: [] for c in FACILITIES}
        started = time.perf_counter()
        for round_index in range(args.rounds):
            clients, children = [], {}
            for corpus in FACILITIES:  # the two facilities at once, one thread each
                out = args.work / f"eps-{name}" / f"round-{round_index}" / corpus
                spec = base_spec(args, global_model, corpus, out) | {
                    "max_steps": args.round_steps, "seed": round_index, "threads": 1,
                }  # fmt: skip
                if target is not None:
                    spec |= {"dp_mode": "dp-sgd", "dp_noise_multiplier": noise[corpus]}
                children[corpus] = launch(spec)
                clients.append(out)
            for corpus, child in children.items():
                run = finish(child)
                peak = max(peak, run["peak_rss_mib"])
                if target is not None:  # what the aggregation side reads back
                    rounds[corpus].append(params_from_metrics(run["privacy"]))
            next_model = args.work / f"eps-{name}" / f"global-{round_index + 1}"
            aggregate(global_model, clients, next_model, strategy="fedavg")
            global_model = next_model
        losses = validation_loss(global_model, sizes, args)
        reached = {
            corpus: round(epsilon([r for r, _ in history], delta=history[0][1]), 3)
            for corpus, history in rounds.items()
            if history
        }
        results[name] = {
            "val_loss": losses,
            "noise_multiplier": {k: round(v, 4) for k, v in noise.items()},
            "epsilon_reached": reached,
            "peak_rss_mib": round(peak, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }
        say(f"federation epsilon {name}: {results[name]}")
        shutil.rmtree(args.work / f"eps-{name}", ignore_errors=True)
    return {"val_loss_before": before, "by_epsilon": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of each throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=10, help="steps per facility per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_train(json.loads(args.child))))
        return 0
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    sys.path.insert(0, str(REPO))
    from xffl_tasks.tiny import make_tiny

    load_before, started = os.getloadavg(), time.perf_counter()
    args.work = Path(tempfile.mkdtemp(prefix="xffl-bench-privacy."))
    try:
        args.tiny = make_tiny(args.work / "tiny", seed=0)
        speed = throughput(args, say)
        federated = federation(args, say)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    import opacus
    import torch

    line = {
        "benchmark": "privacy",
        "model": "tiny LLaMA (xffl_tasks.tiny, seed 0)",
        "steps": args.steps,
        "rounds": args.rounds,
        "round_steps": args.round_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "learning_rate": LEARNING_RATE,
        "dp_max_grad_norm": 1.0,
        "accountant": "rdp",
        "throughput": speed,
        "federation": federated,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
