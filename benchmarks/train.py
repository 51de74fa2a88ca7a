"""Benchmark: our training loop against a plain ``transformers.Trainer``, in one run.

    python benchmarks/train.py [--steps 60] [--batch-size 8] [--seq-len 128] [--threads 1]
                               [--repeat 5] [--sequential]

Makes the tiny model and corpora (``xffl_tasks.tiny``) in a temporary folder (deleted at the
end), then trains the same model on the same Italian training sequences, for the same number
of optimizer steps with the same batch size, sequence length, learning rate, cosine schedule,
gradient clipping, fused AdamW, fp32 precision and CPU threads:

- ours: ``xffl_tasks.train`` (its ``run``: validation before and after, and the save, are
  outside the timed loop);
- baseline: ``transformers.Trainer`` (accelerate underneath) on a dataset of the very same
  sequences (``input_ids`` = ``labels``), no evaluation, no saving, no logging integrations.

Each contender runs in a child process of its own, ``--repeat`` times. By default the two run
at the same time (paired: on a shared machine both then meet the same background load);
``--sequential`` runs them one after the other instead. Seconds are measured inside the
child around the training loop only (ours: the loop's own clock; Trainer: its
``train_runtime``), not the interpreter start, the imports or the model load.

Figures, best run of each contender (every run listed):
- tokens per second = steps x batch size x sequence length / seconds;
- tokens per second of the median step (time between the ends of successive optimizer steps;
  ours from the loop, Trainer's from a callback at ``on_step_end``): steadier against pauses;
- tokens per CPU second of the child's process over the loop;
- ``paired_ratio_median``: the median over repetitions of ours / Trainer (median-step figures).

Prints one JSON line; the machine may be shared: its load average before and after is in it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEARNING_RATE = 0.003


def child_ours(args: argparse.Namespace) -> dict:
    from xffl_tasks.train.config import TrainingConfig
    from xffl_tasks.train.recipe import run

    config = TrainingConfig(
        model=str(args.tiny / "model"),
        data=str(args.tiny / "data" / "italian"),
        out=str(args.work / "ours-out"),
        learning_rate=LEARNING_RATE,
        lr_schedule="cosine",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_steps=args.steps,
        threads=args.threads,
        precision="fp32",
        device="cpu",
        max_grad_norm=1.0,
        val_max_sequences=32,
        log_every=10**6,
    )
    metrics = run(config, environ={})
    shutil.rmtree(config.out, ignore_errors=True)
    return {
        "seconds": metrics["seconds"],
        "cpu_seconds": metrics["cpu_seconds"],
        "step_seconds_median": metrics["step_seconds_median"],
        "tokens": metrics["num_tokens"],
        "train_loss": metrics["train_loss"],
    }


def child_trainer(args: argparse.Namespace) -> dict:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from xffl_tasks.data.dataset import load_dataset

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tiny / "model"), local_files_only=True)
    dataset = load_dataset(
        args.tiny / "data" / "italian", tokenizer=tokenizer, seq_len=args.seq_len
    )
    sequences = dataset.train

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(sequences)

        def __getitem__(self, index: int) -> dict:
            ids = torch.from_numpy(sequences.batch([index])[0])
            return {"input_ids": ids, "labels": ids}

    model = AutoModelForCausalLM.from_pretrained(
        str(args.tiny / "model"), local_files_only=True, dtype=torch.float32
    )
    training_args = TrainingArguments(
        output_dir=str(args.work / "trainer-out"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *args: object, **kwargs: object) -> None:
            step_ends.append(time.perf_counter())

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            step_ends.append(time.perf_counter())

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Sequences(),
        data_collator=default_data_collator,
        callbacks=[StepClock()],
    )
    cpu_started = time.process_time()
    output = trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    shutil.rmtree(training_args.output_dir, ignore_errors=True)
    return {
        "seconds": output.metrics["train_runtime"],
        "cpu_seconds": cpu_seconds,
        "step_seconds_median": statistics.median(b - a for a, b in itertools.pairwise(step_ends)),
        "tokens": args.steps * args.batch_size * args.seq_len,
        "train_loss": output.training_loss,
    }


def start_child(kind: str, args: argparse.Namespace) -> subprocess.Popen:
    argv = [
        sys.executable, __file__, "--child", kind, "--tiny", str(args.tiny), "--work", str(args.work),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        OMP_NUM_THREADS=str(args.threads),
    )
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_child(kind: str, process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_pair(args: argparse.Namespace) -> dict[str, dict]:
    """Both contenders, at the same time (paired) or one after the other (sequential)."""
    if args.sequential:
        return {kind: finish_child(kind, start_child(kind, args)) for kind in ("ours", "trainer")}
    processes = {kind: start_child(kind, args) for kind in ("ours", "trainer")}
    return {kind: finish_child(kind, process) for kind, process in processes.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--sequential", action="store_true", help="one contender after the other, not both at once"
    )
    parser.add_argument("--child", choices=("ours", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_ours(args) if args.child == "ours" else child_trainer(args)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(REPO))
    from xffl_tasks.tiny import make_tiny

    load_before = os.getloadavg()
    args.work = Path(tempfile.mkdtemp(prefix="xffl-bench-train."))
    try:
        args.tiny = make_tiny(args.work / "tiny", seed=0)
        runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
        for _ in range(args.repeat):
            for kind, result in run_pair(args).items():
                runs[kind].append(result)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)

    def tokens_per_second(run: dict, clock: str = "seconds") -> float:
        return run["tokens"] / run[clock]

    best = {kind: max(tokens_per_second(r) for r in kind_runs) for kind, kind_runs in runs.items()}

    def step_rate(run: dict) -> float:
        return args.batch_size * args.seq_len / run["step_seconds_median"]

    best_step = {kind: max(step_rate(r) for r in kind_runs) for kind, kind_runs in runs.items()}
    paired_ratios = [
        step_rate(o) / step_rate(t) for o, t in zip(runs["ours"], runs["trainer"], strict=True)
    ]
    best_cpu = {
        kind: max(tokens_per_second(r, "cpu_seconds") for r in kind_runs)
        for kind, kind_runs in runs.items()
    }
    import torch
    import transformers

    line = {
        "benchmark": "train",
        "model": "tiny LLaMA (xffl_tasks.tiny, seed 0)",
        "mode": "sequential" if args.sequential else "paired",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "ours_tokens_per_second": round(best["ours"], 1),
        "trainer_tokens_per_second": round(best["trainer"], 1),
        "speedup": round(best["ours"] / best["trainer"], 3),
        "ours_tokens_per_second_median_step": round(best_step["ours"], 1),
        "trainer_tokens_per_second_median_step": round(best_step["trainer"], 1),
        "median_step_speedup": round(best_step["ours"] / best_step["trainer"], 3),
        "paired_ratio_median": round(statistics.median(paired_ratios), 3),
        "paired_ratios": [round(r, 3) for r in paired_ratios],
        "ours_tokens_per_cpu_second": round(best_cpu["ours"], 1),
        "trainer_tokens_per_cpu_second": round(best_cpu["trainer"], 1),
        "cpu_speedup": round(best_cpu["ours"] / best_cpu["trainer"], 3),
        "ours_runs": [round(tokens_per_second(r), 1) for r in runs["ours"]],
        "trainer_runs": [round(tokens_per_second(r), 1) for r in runs["trainer"]],
        "ours_median_step_runs": [round(step_rate(r), 1) for r in runs["ours"]],
        "trainer_median_step_runs": [round(step_rate(r), 1) for r in runs["trainer"]],
        "ours_cpu_runs": [round(tokens_per_second(r, "cpu_seconds"), 1) for r in runs["ours"]],
        "trainer_cpu_runs": [
            round(tokens_per_second(r, "cpu_seconds"), 1) for r in runs["trainer"]
        ],
        "ours_train_loss": [round(r["train_loss"], 4) for r in runs["ours"]],
        "trainer_train_loss": [round(r["train_loss"], 4) for r in runs["trainer"]],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
