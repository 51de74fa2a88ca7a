"""What a push or pull did, JSON-safe for XCom and logs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TransferReport:
    """The outcome of one ``push`` or ``pull`` of a model folder.

    :param facility: the facility's name
    :param direction: ``"push"`` (to the facility) or ``"pull"`` (from it)
    :param local_dir: the local folder
    :param remote_dir: the remote folder, absolute, inside the facility's workdir
    :param files: every file of the folder (relative POSIX path) and its verified sha256
    :param bytes_total: the size of all files
    :param bytes_sent: file data that crossed the link, all attempts together
    :param bytes_skipped: the size of the files skipped because the destination already held
        them (same sha256 on both sides)
    :param files_skipped: how many files were skipped so
    :param bytes_resumed: data not sent again because a verified prefix of an interrupted
        transfer was kept
    :param sent_per_attempt: the file data sent by each connection attempt, in order
    :param seconds: wall time of the whole call (scan, hashing, transfer, verification)
    :param mbps: ``bytes_sent`` over ``seconds``, in MB/s (10**6 bytes)
    :param retries: reconnects after a lost link plus files sent again after a mismatch
    :param file_stats: pull only: each local file's ``size`` and ``mtime_ns`` once verified and
        in place, so that a later reader can take its sha256 on trust while they still match
    """

    facility: str
    direction: str
    local_dir: str
    remote_dir: str
    files: dict[str, str] = field(default_factory=dict)
    bytes_total: int = 0
    bytes_sent: int = 0
    bytes_skipped: int = 0
    files_skipped: int = 0
    bytes_resumed: int = 0
    sent_per_attempt: list[int] = field(default_factory=list)
    seconds: float = 0.0
    mbps: float = 0.0
    retries: int = 0
    file_stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A plain dict of JSON types (str, int, float, list, dict)."""
        return asdict(self)
