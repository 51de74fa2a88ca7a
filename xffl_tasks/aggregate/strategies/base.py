"""What every strategy is: typed options, a rule combining client updates, a server step.

A strategy sees one chunk of one tensor at a time: ``updates`` is a ``[clients, n]`` tensor of
client-minus-previous differences (float32, or float64 for F64 tensors), ``weights`` the
clients' normalised weights. ``combine`` turns them into one update (the pseudo-gradient,
negated); ``step`` turns that into the change applied to the global model, reading and
returning the server-optimiser state for the same elements. Every rule is element-wise, so
chunking a tensor anywhere gives the same result. The math lives in pure functions, one
module per algorithm; the classes only validate options and call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from xffl_tasks.aggregate.strategy_options import OptionSpec, checked_options


class Strategy:
    """Base of the strategies; subclasses set the class attributes and the two rules.

    :param options: hyperparameters by name (see ``option_specs``); missing ones default.
    :param num_clients: how many clients the round aggregates.
    """

    name: ClassVar[str]
    option_specs: ClassVar[tuple[OptionSpec, ...]] = ()
    #: Names of the server-optimiser state tensors kept per model tensor (one file each).
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Whether the client weights enter the rule (the robust rules ignore them).
    weighted: ClassVar[bool] = True
    #: Scratch tensors of ``[clients, n]`` the rule allocates per chunk (for the memory budget).
    scratch_per_client: ClassVar[int] = 0

    def __init__(self, *, options: Mapping[str, float] | None = None, num_clients: int):
        self.options = checked_options(self.name, self.option_specs, dict(options or {}), defaults=True)
        self.num_clients = num_clients

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, combined: torch.Tensor, state: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The change to apply to the global model, and the new state (none by default)."""
        return combined, ()
