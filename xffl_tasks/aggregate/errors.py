"""The one error type of the aggregation: bad input, said in one line."""

from __future__ import annotations


class AggregationError(ValueError):
    """Bad input to the aggregation: a client, a file, a tensor, a weight or an option.

    The message names what is wrong and where (the client, the file, the tensor, the field);
    the CLI prints it as one line and exits non-zero. Nothing is left at the output folder.
    """


class NonFiniteClients(AggregationError):
    """Clients whose weights hold NaN or Inf, or whose finite values make the output
    non-finite: ``clients`` maps their index (among the clients aggregated) to the reason."""

    def __init__(self, clients: dict[int, str]):
        self.clients = clients
        super().__init__("; ".join(clients.values()))
