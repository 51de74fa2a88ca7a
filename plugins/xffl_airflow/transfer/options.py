"""Tuning of a transfer: typed, validated, with defaults measured on OpenSSH servers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIB = 1 << 20

# aes128-gcm first: the AES-NI path of the `cryptography` package is the cheapest cipher for
# asyncssh on CPUs of the last decade (chacha20-poly1305 is built from several calls per
# packet there). The others follow for servers that refuse it.
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


@dataclass(frozen=True)
class TransferOptions:
    """How a transfer moves data. Every field may be passed to ``push``/``pull`` as a keyword.

    :param block_size: bytes per SFTP read/write request; lowered to the server's advertised
        limit (261120 on OpenSSH)
    :param max_requests: SFTP requests in flight over the connection, all files together
    :param channels: SFTP channels opened on the one SSH connection; each file's blocks are
        spread over them. An OpenSSH server gives each channel a 2 MiB window, so pushing
        keeps at most ``channels`` x 2 MiB unacknowledged (6: 12 MiB, about 200 MB/s at 50 ms).
        Each file moving also holds a command channel (its hash), and OpenSSH allows 10
        sessions per connection by default (``MaxSessions``): keep ``channels`` +
        ``max_files`` at 10 or below unless the facility allows more
    :param max_files: files moved at once
    :param retries: how often a lost link is reconnected (and a mismatching file sent again)
        before the transfer fails
    :param backoff: seconds before the first retry; doubled each time (jittered, at most 30 s)
    :param segment_size: granularity at which the prefix of an interrupted file is verified
        (sha256 of each segment on both sides) before the transfer resumes after it
    :param progress_interval: seconds between progress lines in the log (also one per 10 %)
    :param max_mbps: cap on the rate, in MB/s (10**6 bytes); None for no cap
    :param ciphers: SSH ciphers in order of preference
    :param skip_unchanged: skip files whose destination already has the same sha256
    :param fsync: flush each file to disk (fsync@openssh.com remotely) before renaming it
    :param command_timeout: seconds allowed for one remote command (sha256sum of a large file)
    :param window: SSH channel receive window, bytes
    :param max_packet: largest SSH packet we accept, bytes
    :param chunk_size: bytes read from or written to a local file at once (in a worker thread)
    :param gather_writes: send all SSH packets of one event-loop turn with one ``send`` call
    """

    block_size: int = 261120
    max_requests: int = 64
    channels: int = 6
    max_files: int = 4
    retries: int = 5
    backoff: float = 1.0
    segment_size: int = 8 * MIB
    progress_interval: float = 5.0
    max_mbps: float | None = None
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    skip_unchanged: bool = True
    fsync: bool = False
    command_timeout: float = 1800.0
    window: int = 16 * MIB
    max_packet: int = 256 * 1024
    chunk_size: int = 4 * MIB
    gather_writes: bool = True

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_requests",
            "channels",
            "max_files",
            "segment_size",
            "window",
            "max_packet",
            "chunk_size",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("retries", self.retries, minimum=0)
        if self.block_size < 1024:
            raise ValueError(
                f"transfer option block_size must be at least 1024 bytes, got {self.block_size}"
            )
        for name in ("backoff", "progress_interval", "command_timeout"):
            _check_number(name, getattr(self, name), positive=name != "backoff")
        if self.max_mbps is not None:
            _check_number("max_mbps", self.max_mbps, positive=True)
        for name in ("skip_unchanged", "fsync", "gather_writes"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"transfer option {name} must be true or false, got {getattr(self, name)!r}"
                )
        ciphers = self.ciphers
        if (
            isinstance(ciphers, str)
            or not ciphers
            or not all(isinstance(c, str) and c for c in ciphers)
        ):
            raise ValueError(
                f"transfer option ciphers must be a non-empty list of cipher names, got {ciphers!r}"
            )
        object.__setattr__(self, "ciphers", tuple(ciphers))

    @classmethod
    def from_tuning(cls, tuning: dict) -> TransferOptions:
        """Options from ``push``/``pull`` keywords; an unknown keyword is named in the error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(tuning) - known)
        if unknown:
            raise ValueError(
                f"unknown transfer option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**tuning)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"transfer option {name} must be a whole number >= {minimum}, got {value!r}"
        )


def _check_number(name: str, value: object, *, positive: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(
            f"transfer option {name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}"
        )
