"""What makes a training run repeatable: every random generator seeded from ``seed`` before the
model is built, and torch's deterministic kernels on CPUs.

With the same configuration (``seed`` included), input model, data, thread count, number of
processes, library versions and CPU, two runs write byte-identical weights. What draws random
numbers: a new LoRA adapter's initial A matrices (PEFT draws them from torch's generator while
the model is built), dropout (reseeded when training starts, so it does not depend on what the
set-up drew), the data order (its own generator, ``schedule.epoch_order``), and whatever a
library draws from Python's or NumPy's global generators.

Not covered: GPUs (cuBLAS, cuDNN and NCCL reductions may change order from run to run; the
deterministic kernels are left off there, as they cost speed), another thread count or another
BLAS (a matrix product's partial sums are split by thread), another number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators (torch: every device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def repeatable(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds every generator and, on CPUs, turns torch's deterministic kernels on (an operation
    without one warns); the previous kernel setting is restored on the way out."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    seed_everything(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
