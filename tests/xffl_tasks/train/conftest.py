"""The tiny model and corpora, made once for the training tests (``python -m xffl_tasks.tiny``'s
own function, in this process), and the two-process ``torchrun`` runs several modules compare.

``torchrun_two`` starts ``torchrun --standalone --nproc-per-node 2 -m xffl_tasks.train`` as a
subprocess (two CPU workers over gloo), each run to its end, at most once per set of flags in
a test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.xffl_tasks.train.equivalence import TWO_PROCESS_FLAGS
from xffl_tasks.tiny import make_tiny

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-train") / "tiny", seed=0)


@pytest.fixture(scope="session")
def torchrun_two(tiny, tmp_path_factory):
    """``run(*flags) -> out``: the training under ``torchrun`` with two workers and
    ``TWO_PROCESS_FLAGS`` plus ``flags``; a second call with the same flags reuses the run."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*flags: str) -> Path:
        if flags not in runs:
            out = tmp_path_factory.mktemp("torchrun") / "out"
            argv = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "xffl_tasks.train", "--model", str(tiny / "model"), "--data", str(tiny / "data" / "czech"),
                "--out", str(out), *TWO_PROCESS_FLAGS, *flags,
            ]  # fmt: skip
            result = subprocess.run(
                argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, result.stdout + result.stderr
            runs[flags] = out
        return runs[flags]

    return run
