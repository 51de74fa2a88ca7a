"""Each client's update norm ``||client - previous||``, before the aggregation pass.

The norm bound (``update_bounds``) needs every client's norm before the streaming pass writes
anything, so it costs a pass of its own, only when the bound is set: every floating tensor,
chunk by chunk, widened to float64 (``client - previous`` is then exact for every dtype up to
float32), summed in tensor order. Memory is a few chunks, whatever the model's size. A client
whose values hold NaN or Inf, or whose squared norm overflows float64, gets no norm but its
problem (the tensor and element named), and is left out as the aggregation pass would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xffl_tasks.aggregate.arithmetic import element_index
from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.model_folder import ModelFolder, TensorLocation

#: Elements per chunk: a few float64 copies of 8 MB each.
NORM_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class ClientNorm:
    """A client's update norm over every floating tensor, or why it has none."""

    norm: float
    problem: str | None = None


class _Reader:
    """``pread``s runs of a tensor's elements, one open descriptor per file."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def read(self, location: TensorLocation, first: int, count: int) -> torch.Tensor:
        path = str(location.shard.path)
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        dtype = location.entry.dtype
        size = count * dtype.itemsize
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            got = os.preadv(
                self.fds[path], [view[done:]], location.offset + first * dtype.itemsize + done
            )
            if got == 0:
                raise AggregationError(
                    f"{location.shard.path}: tensor {location.entry.name!r} ends early (the file changed?)"
                )
            done += got
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype.torch).double()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _non_finite(values: torch.Tensor, shape: Sequence[int], first: int) -> str | None:
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    position = int(bad.nonzero()[0, 0])
    index = element_index(shape, first + position)
    return f"holds {values[position].item()} at index {index} (NaN or Inf in the weights)"


def update_norms(
    previous: ModelFolder,
    clients: Sequence[ModelFolder],
    *,
    chunk_elements: int = NORM_CHUNK_ELEMENTS,
) -> list[ClientNorm]:
    """Each client's ``||client - previous||`` over every floating tensor (float64), in the
    order of ``clients``. Raises AggregationError if the previous model holds NaN or Inf."""
    squares = [0.0] * len(clients)
    problems: list[str | None] = [None] * len(clients)
    reader = _Reader()
    try:
        for shard in previous.shards:
            for entry in shard.header.tensors:
                if not entry.dtype.floating:
                    continue
                for first in range(0, entry.numel, chunk_elements):
                    count = min(chunk_elements, entry.numel - first)
                    before = reader.read(previous.tensors[entry.name], first, count)
                    if not math.isfinite(torch.sum(before).item()):
                        bad = _non_finite(before, entry.shape, first)
                        if bad:
                            raise AggregationError(f"{previous.label}: tensor {entry.name!r} {bad}")
                    for index, client in enumerate(clients):
                        if problems[index] is not None:
                            continue
                        after = reader.read(client.tensors[entry.name], first, count)
                        difference = after - before
                        squares[index] += torch.dot(difference, difference).item()
                        if not math.isfinite(squares[index]):  # NaN or Inf, or an overflow
                            bad = _non_finite(after, entry.shape, first)
                            problems[index] = f"tensor {entry.name!r} " + (
                                bad or "makes the update's squared norm overflow float64"
                            )
    finally:
        reader.close()
    return [
        ClientNorm(math.nan, problem) if problem else ClientNorm(math.sqrt(square))
        for square, problem in zip(squares, problems)
    ]
