"""The arithmetic on one chunk: client updates, the strategy's rule, the new values, statistics.

Per chunk of a floating tensor: the previous values and every client's are widened to float32
(float64 for F64 tensors) into buffers reused from chunk to chunk; ``updates[k] = client_k -
previous``; the strategy combines them and steps its server optimiser; the new values are
``previous + change``, rounded once to the tensor's dtype. On the way it sums, in float64, each
client's squared update norm, each update's dot product with the change, and the change's own
squared norm: the statistics of ``aggregation.json``. A NaN or Inf in an input stops it with
the client, the tensor and the element named. Non-floating tensors (integer buffers) are
carried over from the previous model unchanged.

FedAvg on bf16 and float32 tensors takes a shortcut when numba is installed: one compiled pass
over the chunk's slot (``fused``), the same values and statistics without the float32 copies.
A chunk whose statistics come out non-finite is done again the torch way, which names the
culprit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from xffl_tasks.aggregate import fused
from xffl_tasks.aggregate.chunk_loader import LoadedChunk
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.strategies import Strategy

#: Dtypes whose range is narrower than float32's: rounding to them may overflow.
NARROW_RANGE = frozenset({"F16", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class ChunkResult:
    """A chunk's new bytes (model file, each state file) and its share of the statistics."""

    tensor: str
    model_bytes: memoryview
    state_bytes: list[memoryview]
    squares: list[float] | None = None
    dots: list[float] | None = None
    change_squared: float = 0.0
    elements: int = 0


@dataclass
class UpdateStatistics:
    """Sums over every element of every floating tensor, in float64."""

    squared_norms: list[float]
    dots: list[float]
    change_squared: float = 0.0
    elements: int = 0
    tensors: set[str] = field(default_factory=set)

    def add(self, result: ChunkResult) -> None:
        """Adds a chunk's share (in chunk order, so that the sums do not depend on timing)."""
        if result.squares is None:
            return
        for client, (square, dot) in enumerate(zip(result.squares, result.dots)):
            self.squared_norms[client] += square
            self.dots[client] += dot
        self.change_squared += result.change_squared
        self.elements += result.elements
        self.tensors.add(result.tensor)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy."""
    return memoryview(tensor.view(torch.uint8).numpy())


_RAW_DTYPES = {"BF16": np.uint16, "F32": np.float32}


def fused_kernel(strategy: Strategy, dtype: str):
    """The compiled kernel doing ``strategy`` on ``dtype`` tensors (safetensors name), or None."""
    if strategy.name != "fedavg" or strategy.state_names:
        return None
    return fused.KERNELS.get(dtype)


def element_index(shape: Sequence[int], flat: int) -> list[int]:
    """The multi-dimensional index of element ``flat`` of a row-major tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat, position = divmod(flat, size)
        index.append(position)
    return index[::-1]


class ChunkArithmetic:
    """Applies ``strategy`` to chunks of up to ``capacity`` elements, keeping the statistics.

    :param strategy: the rule and server step.
    :param weights: the clients' normalised weights, in source order.
    :param labels: how messages name the sources: previous model first, then each client.
    :param capacity: the most elements one chunk holds.
    """

    def __init__(
        self, *, strategy: Strategy, weights: Sequence[float], labels: Sequence[str], capacity: int
    ):
        self.strategy = strategy
        self.labels = list(labels)
        self.clients = len(weights)
        self.capacity = capacity
        self._weights = {
            dtype: torch.tensor(list(weights), dtype=dtype)
            for dtype in (torch.float32, torch.float64)
        }
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._fused_weights = np.array(list(weights), dtype=np.float32)

    def _buffer(self, slot: int, dtype: torch.dtype, elements: int) -> torch.Tensor:
        with self._lock:
            if (slot, dtype) not in self._buffers:
                self._buffers[slot, dtype] = torch.empty(elements, dtype=dtype)
            return self._buffers[slot, dtype]

    def _work(self, slot: int, compute: torch.dtype, output: torch.dtype, count: int):
        """Slot ``slot``'s working buffers: previous values, updates, output (reused)."""
        work = self._buffer(slot, compute, (1 + self.clients) * self.capacity)
        previous = work[:count]
        updates = work[self.capacity : self.capacity + self.clients * count]
        out = self._buffer(slot, output, self.capacity) if output != compute else None
        return previous, updates.view(self.clients, count), out[:count] if out is not None else None

    def apply(self, chunk: LoadedChunk) -> ChunkResult:
        """The chunk's new bytes and its statistics; thread-safe across distinct slots.

        The bytes live in the chunk's slot: valid until the slot is handed back.
        """
        task = chunk.task
        dtype = task.tensor.dtype
        if not dtype.floating:
            return ChunkResult(task.tensor.name, chunk.raw(0), [])
        kernel = fused_kernel(self.strategy, dtype.name)
        if kernel is not None:
            result = self._apply_fused(kernel, chunk)
            if result is not None:
                return result
        previous, updates, output = self._work(chunk.index, dtype.compute, dtype.torch, task.count)
        previous.copy_(chunk.tensor(0))
        for client in range(self.clients):
            updates[client].copy_(chunk.tensor(1 + client)).sub_(previous)
        squares = [torch.dot(update, update).item() for update in updates]
        if not all(math.isfinite(square) for square in squares):
            self._check_finite(chunk, updates, squares)
        combined = self.strategy.combine(updates, self._weights[dtype.compute])
        state = [chunk.tensor(1 + self.clients + s) for s in range(len(self.strategy.state_names))]
        change, new_state = self.strategy.step(combined, state)
        change_squared = torch.dot(change, change).item()
        if not math.isfinite(change_squared):
            raise AggregationError(
                f"tensor {task.tensor.name!r}: the {self.strategy.name} change is not finite "
                "(server state or options out of range?)"
            )
        dots = torch.mv(updates, change).tolist()
        previous.add_(change)
        if output is None:  # the tensor's dtype is the compute dtype
            output = previous
        else:
            output.copy_(previous)
        if dtype.name in NARROW_RANGE and not bool(torch.isfinite(output.float()).all()):
            raise AggregationError(
                f"tensor {task.tensor.name!r}: the new values overflow {dtype.name} "
                "(server learning rate too large?)"
            )
        return ChunkResult(
            task.tensor.name,
            as_bytes(output),
            [as_bytes(s.contiguous()) for s in new_state],
            squares,
            dots,
            change_squared,
            task.count,
        )

    def _apply_fused(self, kernel, chunk: LoadedChunk) -> ChunkResult | None:
        """The chunk by the compiled kernel; None if a statistic is not finite (NaN or Inf in an
        input, or squares beyond float64): the torch way then says which."""
        task = chunk.task
        raw = _RAW_DTYPES[task.tensor.dtype.name]
        itemsize = np.dtype(raw).itemsize
        block = chunk.block
        previous = np.frombuffer(block.block, raw, task.count, block.offsets[0])
        # the clients' buffers follow each other in the slot's block, equally spaced
        spacing = block.offsets[2] - block.offsets[1] if self.clients > 1 else len(block.buffers[1])
        stride = spacing // itemsize
        clients = np.frombuffer(block.block, raw, self.clients * stride, block.offsets[1])
        clients = clients.reshape(self.clients, stride)  # the kernel reads task.count of each
        out = self._buffer(chunk.index, torch.uint8, self.capacity * itemsize)
        out = out[: task.count * itemsize].numpy().view(raw)
        squares = np.zeros(self.clients)
        dots = np.zeros(self.clients)
        change_squared = kernel(previous, clients, self._fused_weights, out, squares, dots)
        if not (np.isfinite(squares).all() and np.isfinite(dots).all()):
            return None
        if not math.isfinite(change_squared):
            return None
        return ChunkResult(
            task.tensor.name,
            memoryview(out.view(np.uint8)),
            [],
            squares.tolist(),
            dots.tolist(),
            float(change_squared),
            task.count,
        )

    def _check_finite(
        self, chunk: LoadedChunk, updates: torch.Tensor, squares: list[float]
    ) -> None:
        """Raises, naming the source, tensor and element, if an input holds NaN or Inf.

        Finite inputs whose squares overflow float32 get their squared norms in float64.
        """
        self._raise_if_not_finite(chunk, 0)
        for client, square in enumerate(squares):
            if not math.isfinite(square):
                self._raise_if_not_finite(chunk, 1 + client)
                squares[client] = torch.dot(
                    updates[client].double(), updates[client].double()
                ).item()

    def _raise_if_not_finite(self, chunk: LoadedChunk, source: int) -> None:
        values = chunk.tensor(source).float()  # isfinite has no float8 kernels
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            tensor = chunk.task.tensor
            index = element_index(tensor.shape, chunk.task.first + position)
            raise AggregationError(
                f"{self.labels[source]}: tensor {tensor.name!r} holds {values[position].item()} "
                f"at index {index} (NaN or Inf in the weights)"
            )
