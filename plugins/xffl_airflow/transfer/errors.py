"""The one error a transfer raises, and the internal signal that an attempt may be retried."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A model transfer failed; the message names the facility and the file or folder.

    :param facility: the facility's name (``RemoteFacility.name``)
    :param message: what went wrong, naming the path concerned
    :param path: the file or folder concerned (remote or local), when there is one
    :param retryable: True when the same call may succeed later (link down, sshd restarting);
        False for what another attempt cannot fix (permission denied, disk full, bad path)
    """

    def __init__(
        self, facility: str, message: str, *, path: str | None = None, retryable: bool = False
    ):
        super().__init__(f"facility {facility}: {message}")
        self.facility = facility
        self.path = path
        self.retryable = retryable


class RetryableFailure(Exception):
    """Raised inside an attempt when reconnecting and resuming may succeed (link lost, timeout)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
