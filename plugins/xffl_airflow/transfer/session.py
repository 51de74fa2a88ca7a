"""One attempt's session with a facility: the SSH connection, its SFTP client, remote commands,
and the remote half of path confinement (symlinks resolved by the server's ``realpath``).

Errors leave here in two kinds only: ``TransferError`` (naming the facility and path) for what
another attempt cannot fix, ``RetryableFailure`` when the link went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import stat
from collections.abc import Iterator

import asyncssh

from xffl_airflow.ssh import FacilityConnectionError, SSHTarget
from xffl_airflow.transfer import commands
from xffl_airflow.transfer.connection import open_connection
from xffl_airflow.transfer.errors import RetryableFailure, TransferError
from xffl_airflow.transfer.facility import RemoteFacility, is_within
from xffl_airflow.transfer.options import TransferOptions

log = logging.getLogger(__name__)

# What a dropped link, a killed sshd or a closing connection raise inside asyncssh and asyncio.
LINK_ERRORS = (
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    ConnectionError,
    TimeoutError,
)


class FacilitySession:
    """The SSH connection and SFTP client of one attempt; open with ``await FacilitySession.open``."""

    def __init__(
        self,
        facility: RemoteFacility,
        conn: asyncssh.SSHClientConnection,
        sftp: asyncssh.SFTPClient,
        options: TransferOptions,
        real_workdir: str,
    ):
        self.facility = facility
        self.conn = conn
        self.sftp = sftp
        self.options = options
        self.real_workdir = real_workdir
        limits = sftp.limits
        self.read_block = min(options.block_size, limits.max_read_len or options.block_size)
        self.write_block = min(options.block_size, limits.max_write_len or options.block_size)

    @classmethod
    async def open(cls, facility: RemoteFacility, target: SSHTarget, options: TransferOptions) -> FacilitySession:
        try:
            conn = await open_connection(target, options)
        except FacilityConnectionError as error:
            if error.retryable:
                raise RetryableFailure(str(error)) from None
            raise TransferError(facility.name, str(error)) from None
        try:
            sftp = await conn.start_sftp_client()
            real_workdir = await sftp.realpath(facility.workdir)
        except asyncssh.SFTPNoSuchFile:
            conn.close()
            raise TransferError(facility.name, f"workdir {facility.workdir} does not exist", path=facility.workdir) from None
        except (*LINK_ERRORS, asyncssh.Error) as error:
            conn.close()
            raise RetryableFailure(f"cannot start SFTP: {type(error).__name__}: {error}") from None
        log.debug("facility %s: SFTP session open, cipher %s", facility.name, conn.get_extra_info("send_cipher"))
        return cls(facility, conn, sftp, options, real_workdir)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.exit()
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 10)

    @contextlib.contextmanager
    def translate(self, action: str, path: str) -> Iterator[None]:
        """Turns asyncssh errors of ``action`` on ``path`` into ``TransferError``/``RetryableFailure``."""
        name = self.facility.name
        try:
            yield
        except asyncssh.SFTPNoSuchFile:
            raise TransferError(name, f"cannot {action} {path}: no such file or folder", path=path) from None
        except asyncssh.SFTPPermissionDenied:
            raise TransferError(name, f"cannot {action} {path}: permission denied", path=path) from None
        except LINK_ERRORS as error:
            raise RetryableFailure(f"link lost while trying to {action} {path} ({type(error).__name__}: {error})") from None
        except asyncssh.SFTPError as error:
            raise TransferError(name, f"cannot {action} {path}: {error.reason or type(error).__name__}", path=path) from None

    # remote commands

    async def run(self, command: str, *, action: str, path: str) -> str:
        """Runs a shell command on the facility and returns its stdout; fails naming ``path``."""
        with self.translate(action, path):
            try:
                result = await self.conn.run(command, check=False, timeout=self.options.command_timeout)
            except asyncssh.TimeoutError as error:
                raise RetryableFailure(f"{action} {path} took over {self.options.command_timeout} s") from error
        if result.exit_status != 0:
            stderr = str(result.stderr or "").strip()[-500:]
            status = result.exit_status if result.exit_status is not None else f"signal {result.exit_signal}"
            if result.exit_status is None and not stderr:
                raise RetryableFailure(f"{action} {path}: remote command ended without status ({status})")
            raise TransferError(self.facility.name, f"cannot {action} {path} (exit {status}): {stderr}", path=path)
        return str(result.stdout or "")

    async def sha256(self, path: str) -> str:
        output = await self.run(commands.build_sha256(path), action="hash", path=path)
        try:
            return commands.parse_sha256(output, path)
        except ValueError as error:
            raise TransferError(self.facility.name, str(error), path=path) from None

    async def segment_hashes(self, path: str, length: int) -> list[str]:
        segment = self.options.segment_size
        output = await self.run(commands.build_segment_hashes(path, length, segment), action="hash segments of", path=path)
        try:
            return commands.parse_segment_hashes(output, length, segment)
        except ValueError as error:
            raise TransferError(self.facility.name, f"{path}: {error}", path=path) from None

    # paths

    async def confine(self, path: str) -> str:
        """The server's ``realpath`` of an existing ``path``; refused when it leaves the workdir."""
        with self.translate("resolve", path):
            real = await self.sftp.realpath(path)
        if not is_within(self.real_workdir, real):
            raise TransferError(
                self.facility.name,
                f"{path} resolves to {real}, outside the workdir {self.facility.workdir}: refused",
                path=path,
            )
        return real

    async def lstat(self, path: str) -> asyncssh.SFTPAttrs | None:
        """The path's own attributes (a symlink is not followed), None when it does not exist."""
        with self.translate("inspect", path):
            try:
                return await self.sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None

    async def stat(self, path: str) -> asyncssh.SFTPAttrs:
        with self.translate("inspect", path):
            return await self.sftp.stat(path)

    async def make_dirs(self, path: str) -> None:
        """Creates ``path`` and the missing folders above it, down from the workdir, each checked."""
        relative = posixpath.relpath(path, self.facility.workdir)
        current = self.facility.workdir
        for part in [] if relative == "." else relative.split("/"):
            current = posixpath.join(current, part)
            attrs = await self.lstat(current)
            if attrs is None:
                with self.translate("create folder", current):
                    try:
                        await self.sftp.mkdir(current)
                    except asyncssh.SFTPFailure:
                        if await self.lstat(current) is None:  # not made meanwhile by someone else
                            raise
                continue
            if stat.S_ISLNK(attrs.permissions or 0):
                await self.confine(current)
                attrs = await self.stat(current)
            if not stat.S_ISDIR(attrs.permissions or 0):
                raise TransferError(self.facility.name, f"{current} exists and is not a folder", path=current)
        await self.confine(path)

    async def remove(self, path: str) -> None:
        """Removes a file (or a symlink itself); missing is fine."""
        with self.translate("remove", path), contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await self.sftp.remove(path)

    async def replace(self, source: str, destination: str) -> None:
        """Renames ``source`` over ``destination`` atomically (posix-rename@openssh.com)."""
        with self.translate("rename into place", destination):
            try:
                await self.sftp.posix_rename(source, destination)
            except asyncssh.SFTPOpUnsupported:
                # plain SFTP rename refuses an existing target: remove it first
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await self.sftp.remove(destination)
                await self.sftp.rename(source, destination)

    async def free_bytes(self, path: str) -> int | None:
        """Bytes free to the user in the file system of ``path``; None if the server cannot tell."""
        try:
            with self.translate("check free space at", path):
                vfs = await self.sftp.statvfs(path)
        except TransferError:
            return None
        return vfs.bavail * vfs.frsize
