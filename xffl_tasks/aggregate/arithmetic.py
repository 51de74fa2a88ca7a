"""The arithmetic on one chunk: client updates, the strategy's rule, the new values, statistics.

Per chunk of a floating tensor: the previous values and every client's are widened to float32
(float64 for F64 tensors) into buffers reused from chunk to chunk; ``updates[k] = client_k -
previous``; the strategy combines them and steps its server optimiser; the new values are
``previous + change``, rounded once to the tensor's dtype. On the way it sums, in float64, each
client's squared update norm, each update's dot product with the change, and the change's own
squared norm: the statistics of ``aggregation.json``. A NaN or Inf in an input stops it with
the client, the tensor and the element named. Every output is checked finite (the update,
the change, the new values in the tensor's dtype, the new server state; statistics that only
overflow float32 are summed again in float64): when finite inputs overflow, the clients to
blame are found by leaving them out (``finite_output``) and raised as ``NonFiniteClients``.
A client's update may be scaled (``scales``: the norm bound's clipping). Non-floating tensors
(integer buffers) are carried over from the previous model unchanged.

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
from xffl_tasks.aggregate.errors import AggregationError, NonFiniteClients
from xffl_tasks.aggregate.finite_output import chunk_culprits
from xffl_tasks.aggregate.strategies import Strategy


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


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is finite only if every term is, and costs a
    fraction of ``isfinite``; only a sum that overflows (or holds NaN or Inf) is looked at
    element by element. float8 is widened first (no float8 kernels)."""
    if tensor.dtype in _FLOAT8:
        tensor = tensor.float()
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if math.isfinite(torch.sum(tensor, dtype=wide).item()):
        return True
    return bool(torch.isfinite(tensor).all())


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
    :param scales: per client, a factor on its update (the norm bound's clipping); None: ones.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        weights: Sequence[float],
        labels: Sequence[str],
        capacity: int,
        scales: Sequence[float] | None = None,
    ):
        self.strategy = strategy
        self.labels = list(labels)
        self.clients = len(weights)
        self.capacity = capacity
        self.weights = [float(w) for w in weights]
        self.scales = [float(s) for s in scales] if scales is not None else [1.0] * self.clients
        self.scaled = any(s != 1.0 for s in self.scales)
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
        kernel = fused_kernel(self.strategy, dtype.name) if not self.scaled else None
        if kernel is not None:
            result = self._apply_fused(kernel, chunk)
            if result is not None:
                return result
        previous, updates, output = self._work(chunk.index, dtype.compute, dtype.torch, task.count)
        previous.copy_(chunk.tensor(0))
        for client in range(self.clients):
            updates[client].copy_(chunk.tensor(1 + client)).sub_(previous)
            if self.scales[client] != 1.0:
                updates[client].mul_(self.scales[client])
        squares = [torch.dot(update, update).item() for update in updates]
        if not all(math.isfinite(square) for square in squares):
            self._check_finite(chunk, updates, squares)
            if not all(math.isfinite(square) for square in squares):
                self._overflow(chunk, f"an update overflows {dtype.compute}")
        combined = self.strategy.combine(updates, self._weights[dtype.compute])
        state = [chunk.tensor(1 + self.clients + s) for s in range(len(self.strategy.state_names))]
        change, new_state = self.strategy.step(combined, state)
        change_squared = torch.dot(change, change).item()
        if not math.isfinite(change_squared):
            if not _finite(change):
                self._overflow(
                    chunk,
                    f"the {self.strategy.name} change is not finite (server state or options "
                    "out of range?)",
                )
            change_squared = torch.dot(change.double(), change.double()).item()
        dots = torch.mv(updates, change).tolist()
        if not all(math.isfinite(dot) for dot in dots):  # products beyond float32's range
            dots = torch.mv(updates.double(), change.double()).tolist()
        previous.add_(change)
        if output is None:  # the tensor's dtype is the compute dtype
            output = previous
        else:
            output.copy_(previous)
        if not _finite(output):
            self._overflow(
                chunk, f"the new values overflow {dtype.name} (server learning rate too large?)"
            )
        if not all(_finite(s) for s in new_state):
            self._overflow(chunk, f"the {self.strategy.name} server state is not finite")
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
        # A new value is a convex combination of finite inputs (the weights sum to one), up to
        # float32 rounding: it can exceed bf16's largest value by far less than the half ulp
        # that rounds it to Inf. float32's own largest value has no such headroom: checked.
        if raw is np.float32 and not _finite(torch.from_numpy(out)):
            return None  # a new value overflows: the torch way finds the client to blame
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

    def _overflow(self, chunk: LoadedChunk, problem: str) -> None:
        """Raises NonFiniteClients naming the clients whose leaving out makes the chunk's
        output finite, else AggregationError with ``problem`` (the inputs are finite)."""
        task = chunk.task
        compute = task.tensor.dtype.compute
        states = len(self.strategy.state_names)
        culprits = chunk_culprits(
            self.strategy,
            chunk.tensor(0).to(compute),
            [chunk.tensor(1 + client) for client in range(self.clients)],
            self.weights,
            self.scales,
            [chunk.tensor(1 + self.clients + s).clone() for s in range(states)],
            task.tensor.dtype.torch,
        )
        name = task.tensor.name
        if culprits is None:
            raise AggregationError(f"tensor {name!r}: {problem}")
        raise NonFiniteClients(
            {
                client: f"tensor {name!r}: its values (up to {distance:.6g} from the previous "
                f"model's) make the {self.strategy.name} output non-finite ({problem})"
                for client, distance in culprits.items()
            }
        )

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
