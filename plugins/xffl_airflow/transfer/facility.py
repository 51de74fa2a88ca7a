"""A facility endpoint for transfers, and the pure rules that keep remote paths in its workdir.

These checks are lexical: they refuse ``..``, absolute paths outside the workdir and names that
cannot travel safely through a remote shell and back (``xffl_airflow.remote_text``). Symlinks
that escape are caught on the remote side (``session.FacilitySession.confine``), where they can
be resolved.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from xffl_airflow.remote_text import RemoteNameError, check_remote_name, refused_char
from xffl_airflow.transfer.errors import TransferError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,249}")

PART_SUFFIX = ".xffl-part"


@dataclass(frozen=True)
class RemoteFacility:
    """A facility that models move to and from, over its Airflow SSH connection.

    :param name: the facility's name, used in logs and errors
    :param conn_id: the Airflow SSH connection that reaches it (host key pinned)
    :param workdir: absolute folder on the facility; every remote path of a transfer stays in it
    """

    name: str
    conn_id: str
    workdir: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"facility name must be 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit), got {self.name!r}"
            )
        if not isinstance(self.conn_id, str) or not _CONN_ID.fullmatch(self.conn_id):
            raise ValueError(
                f"facility {self.name}: conn_id must be an Airflow connection id, got {self.conn_id!r}"
            )
        workdir = self.workdir
        if not isinstance(workdir, str) or not workdir.startswith("/") or refused_char(workdir):
            raise ValueError(
                f"facility {self.name}: workdir must be an absolute path without line breaks, "
                f"control characters or backslashes, got {workdir!r}"
            )
        if ".." in workdir.split("/"):
            raise ValueError(
                f"facility {self.name}: workdir must not contain '..', got {workdir!r}"
            )
        normalized = posixpath.normpath(workdir)
        if normalized == "/":
            raise ValueError(f"facility {self.name}: workdir must not be the filesystem root")
        object.__setattr__(self, "workdir", normalized)

    def resolve(self, path: str) -> str:
        """The absolute remote path of ``path`` (relative to the workdir, or absolute inside it).

        Refuses ``..``, paths outside the workdir and unsafe characters, naming the facility.
        """
        if not isinstance(path, str) or not path.strip():
            raise TransferError(
                self.name, f"remote path must be a non-empty string, got {path!r}", path=str(path)
            )
        try:
            check_remote_name(path, "remote path")
        except RemoteNameError as error:
            raise TransferError(self.name, str(error), path=path) from None
        if ".." in path.split("/"):
            raise TransferError(
                self.name, f"remote path {path!r} contains '..': refused", path=path
            )
        absolute = posixpath.normpath(
            path if path.startswith("/") else posixpath.join(self.workdir, path)
        )
        if not is_within(self.workdir, absolute):
            raise TransferError(
                self.name,
                f"remote path {path!r} is outside the facility's workdir {self.workdir}",
                path=path,
            )
        return absolute


def is_within(root: str, path: str) -> bool:
    """Whether normalized absolute ``path`` is ``root`` or below it (both POSIX)."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def check_relative_name(relative: str) -> str:
    """A file's path inside a model folder, as it travels: POSIX, relative, no ``..``.

    Raises ValueError naming the path (with ``repr``) when it cannot be used safely.
    """
    if not isinstance(relative, str) or not relative or relative.startswith("/"):
        raise ValueError(f"unusable file name {relative!r} (absolute or empty)")
    check_remote_name(relative, "file name")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"unusable file name {relative!r} (empty, '.' or '..' component)")
    if parts[-1].endswith(PART_SUFFIX):
        raise ValueError(
            f"file name {relative!r} ends with {PART_SUFFIX}, which marks unfinished transfers"
        )
    return relative


def part_path(final: str) -> str:
    """The temporary name beside ``final`` that receives data until it is verified (POSIX or local)."""
    head, tail = posixpath.split(final)
    return posixpath.join(head, f".{tail}{PART_SUFFIX}")


def is_part_name(name: str) -> bool:
    """Whether a file name is one of our temporary names."""
    return name.startswith(".") and name.endswith(PART_SUFFIX)
