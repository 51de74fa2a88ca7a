"""FedAvg on one chunk in one pass over memory: compiled kernels (numba), when it is installed.

For bf16 (as raw 16-bit patterns) and float32 tensors, per element: widen the previous value
and every client's to float32, ``update_k = client_k - previous``, ``change = sum_k w_k *
update_k`` (in client order), ``new = previous + change`` rounded once to the tensor's dtype
(to nearest even, as torch rounds), and on the way each client's squared update norm, each
update's dot product with the change and the change's squared norm, in float64. No
temporaries the size of the chunk: the inputs are read from the chunk's slot, the output is
written once. The work goes block by block (``BLOCK`` elements: the change, then the dot
products, while the block is in the L1 cache).

Each element gets the same float32 operations, in the same order, wherever it sits in the
chunk, so chunking never changes the result. The one fast-math licence is ``reassoc``, which
lets the float64 sums (norms, dot products) vectorise; every float32 expression of an element
has two operands, and there is no ``contract`` (fused multiply-add), ``nnan`` or ``ninf``: a
NaN or Inf in an input shows in the squared norms, and the caller redoes the chunk with torch,
which names it.

The kernels release the GIL, so the compute threads run them on both cores. They are compiled
on import, or loaded from numba's cache (``__pycache__`` beside this file, else
``NUMBA_CACHE_DIR``). Without numba, ``KERNELS`` is empty and ``arithmetic.ChunkArithmetic``
does the same with torch operations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

#: Elements per block: a block's change is kept in a small buffer, read back per client.
BLOCK = 2048
#: The one fast-math licence: sums may be reassociated, so that the float64 reductions
#: vectorise. No element's value depends on it: each is a sum of two terms at most.
#: No ``nnan``/``ninf``: a NaN or Inf must show in the squared norms.
_REASSOCIATE = {"reassoc"}

try:
    from numba import njit
except ImportError:  # pragma: no cover (numba is in requirements.lock)
    njit = None

#: The kernels' signature, compiled on import (never cached on disk: numba's cache is a pickle,
#: and no pickle is ever loaded; the preloading executor compiles once, before it forks): previous values,
#: clients (one row each: its first ``len(previous)`` elements are read), weights, output,
#: squares, dots. Contiguous arrays only: strided ones would not vectorise.
_SIGNATURE = "float64({0}[::1], {0}[:, ::1], float32[::1], {0}[::1], float64[::1], float64[::1])"

KERNELS: dict[str, Callable] = {}

if njit is not None:

    @njit(nogil=True, cache=False, inline="always")
    def _widen_bf16(bits):
        return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)

    @njit(nogil=True, cache=False, inline="always")
    def _narrow_bf16(value):
        bits = np.float32(value).view(np.uint32)
        bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return np.uint16(bits >> np.uint32(16))

    @njit(_SIGNATURE.format("uint16"), nogil=True, cache=False, fastmath=_REASSOCIATE)
    def fedavg_bf16(previous, clients, weights, out, squares, dots):
        """``previous``, ``out``: uint16 [n] (bf16 bits); ``clients``: uint16 [k, >= n];
        ``weights``: float32 [k]. Adds each client's squared update norm and dot product with
        the change into ``squares`` and ``dots`` (float64 [k]); returns the change's squared
        norm."""
        k = clients.shape[0]
        n = previous.shape[0]
        change = np.empty(BLOCK, np.float32)
        change_squared = 0.0
        for start in range(0, n, BLOCK):
            m = min(n, start + BLOCK) - start
            # views of the block, indexed from zero (indices numba knows to be non-negative
            # need no wraparound check, and the loops vectorise)
            before = previous[start : start + m]
            after = out[start : start + m]
            for i in range(m):
                change[i] = np.float32(0.0)
            for j in range(k):
                w = weights[j]
                row = clients[j, start : start + m]
                square = 0.0
                for i in range(m):
                    d = _widen_bf16(row[i]) - _widen_bf16(before[i])
                    square += np.float64(d) * np.float64(d)
                    change[i] = change[i] + w * d
                squares[j] += square
            for j in range(k):
                row = clients[j, start : start + m]
                dot = 0.0
                for i in range(m):
                    d = _widen_bf16(row[i]) - _widen_bf16(before[i])
                    dot += np.float64(d) * np.float64(change[i])
                dots[j] += dot
            for i in range(m):
                c = change[i]
                change_squared += np.float64(c) * np.float64(c)
                after[i] = _narrow_bf16(_widen_bf16(before[i]) + c)
        return change_squared

    @njit(_SIGNATURE.format("float32"), nogil=True, cache=False, fastmath=_REASSOCIATE)
    def fedavg_f32(previous, clients, weights, out, squares, dots):
        """As ``fedavg_bf16``, on float32 values."""
        k = clients.shape[0]
        n = previous.shape[0]
        change = np.empty(BLOCK, np.float32)
        change_squared = 0.0
        for start in range(0, n, BLOCK):
            m = min(n, start + BLOCK) - start
            # views of the block, indexed from zero (indices numba knows to be non-negative
            # need no wraparound check, and the loops vectorise)
            before = previous[start : start + m]
            after = out[start : start + m]
            for i in range(m):
                change[i] = np.float32(0.0)
            for j in range(k):
                w = weights[j]
                row = clients[j, start : start + m]
                square = 0.0
                for i in range(m):
                    d = row[i] - before[i]
                    square += np.float64(d) * np.float64(d)
                    change[i] = change[i] + w * d
                squares[j] += square
            for j in range(k):
                row = clients[j, start : start + m]
                dot = 0.0
                for i in range(m):
                    d = row[i] - before[i]
                    dot += np.float64(d) * np.float64(change[i])
                dots[j] += dot
            for i in range(m):
                c = change[i]
                change_squared += np.float64(c) * np.float64(c)
                after[i] = before[i] + c
        return change_squared

    KERNELS = {"BF16": fedavg_bf16, "F32": fedavg_f32}
