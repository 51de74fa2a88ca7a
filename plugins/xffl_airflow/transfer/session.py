"""One attempt's session with a facility: the SSH connection, its SFTP client, remote commands,
and the remote half of path confinement (symlinks resolved by the server's ``realpath``).

Errors leave here in two kinds only: ``TransferError`` (naming the facility and path) for what
another attempt cannot fix, ``RetryableFailure`` when the link went away. Remote commands are
framed against the login shell's own output (``remote_exec``); an SFTP subsystem that the shell's
output breaks is reported as such, once, without retries.
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
from xffl_airflow.transfer.remote_exec import (
    FramedCommand,
    noisy_sftp_message,
    read_result,
    timeout_message,
)

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
        channels: list[asyncssh.SFTPClient],
        options: TransferOptions,
        real_workdir: str,
    ):
        self.facility = facility
        self.conn = conn
        self.channels = channels
        self.sftp = channels[0]  # for everything but bulk data
        self.options = options
        self.real_workdir = real_workdir
        limits = self.sftp.limits
        self.read_block = min(options.block_size, limits.max_read_len or options.block_size)
        self.write_block = min(options.block_size, limits.max_write_len or options.block_size)
        # which hashing tools the facility has: asked when the session opens, awaited on first use
        self._probe = asyncio.ensure_future(self._probe_tools())

    @classmethod
    async def open(
        cls, facility: RemoteFacility, target: SSHTarget, options: TransferOptions
    ) -> FacilitySession:
        try:
            conn = await open_connection(target, options)
        except FacilityConnectionError as error:
            if error.retryable:
                raise RetryableFailure(str(error)) from None
            raise TransferError(facility.name, str(error)) from None
        try:
            # Each SFTP channel has its own flow-control window and its own sftp-server process
            # on the facility: data spread over a few of them keeps more bytes in flight.
            channels = await asyncio.gather(
                *(conn.start_sftp_client() for _ in range(options.channels))
            )
            real_workdir = await channels[0].realpath(facility.workdir)
        except asyncssh.SFTPBadMessage as error:
            # what a login shell printing on stdout does to an sftp-server started through it
            noise = await shell_stdout(conn, options)
            conn.close()
            if noise:
                raise TransferError(facility.name, noisy_sftp_message(noise, error)) from None
            raise RetryableFailure(f"cannot start SFTP: {type(error).__name__}: {error}") from None
        except asyncssh.SFTPNoSuchFile:
            conn.close()
            raise TransferError(
                facility.name, f"workdir {facility.workdir} does not exist", path=facility.workdir
            ) from None
        except (*LINK_ERRORS, asyncssh.Error) as error:
            conn.close()
            raise RetryableFailure(f"cannot start SFTP: {type(error).__name__}: {error}") from None
        return cls(facility, conn, list(channels), options, real_workdir)

    async def _probe_tools(self) -> commands.HashTools:
        output = await self.run(
            commands.PROBE, action="probe hashing tools on", path=self.facility.workdir, check=False
        )
        tools = commands.parse_probe(output)
        log.debug("facility %s: hashing with %s", self.facility.name, tools)
        return tools

    async def hash_tools(self) -> commands.HashTools:
        """What the facility hashes with (openssl, python3; sha256sum otherwise)."""
        return await asyncio.shield(self._probe)

    async def close(self) -> None:
        self._probe.cancel()
        await asyncio.gather(self._probe, return_exceptions=True)
        for channel in self.channels:
            with contextlib.suppress(Exception):
                channel.exit()
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
            raise TransferError(
                name, f"cannot {action} {path}: no such file or folder", path=path
            ) from None
        except asyncssh.SFTPPermissionDenied:
            raise TransferError(
                name, f"cannot {action} {path}: permission denied", path=path
            ) from None
        except LINK_ERRORS as error:
            raise RetryableFailure(
                f"link lost while trying to {action} {path} ({type(error).__name__}: {error})"
            ) from None
        except asyncssh.SFTPError as error:
            raise TransferError(
                name, f"cannot {action} {path}: {error.reason or type(error).__name__}", path=path
            ) from None

    # remote commands

    async def run(self, command: str, *, action: str, path: str, check: bool = True) -> str:
        """Runs a shell command on the facility (framed against the login shell's output) and
        returns its own stdout; fails naming ``path`` (with ``check``, on a non-zero exit)."""
        framed = FramedCommand(command)
        limit = self.options.command_timeout
        with self.translate(action, path):
            try:
                result = await self.conn.run(framed.text, check=False, timeout=limit, encoding=None)
            except asyncssh.TimeoutError:
                raise RetryableFailure(
                    timeout_message(self.facility.name, command, limit)
                ) from None
        return read_result(
            self.facility.name, framed, result.stdout, result.stderr, result.exit_status,
            result.exit_signal, action=action, path=path, check=check,
        )  # fmt: skip

    async def sha256(self, path: str) -> str:
        tools = await self.hash_tools()
        output = await self.run(commands.build_sha256(tools, path), action="hash", path=path)
        try:
            return commands.parse_sha256(output, path)
        except ValueError as error:
            raise TransferError(self.facility.name, str(error), path=path) from None

    async def segment_hashes(self, path: str, length: int) -> list[str]:
        segment = self.options.segment_size
        tools = await self.hash_tools()
        output = await self.run(
            commands.build_segment_hashes(tools, path, length, segment),
            action="hash segments of",
            path=path,
        )
        try:
            return commands.parse_segment_hashes(output, length, segment)
        except ValueError as error:
            raise TransferError(self.facility.name, f"{path}: {error}", path=path) from None

    def growing_hash(self, path: str) -> GrowingHash:
        """A hasher of ``path`` on the facility that follows the file as it is written."""
        return GrowingHash(self, path)

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
                raise TransferError(
                    self.facility.name, f"{current} exists and is not a folder", path=current
                )
        await self.confine(path)

    async def open_file(
        self, path: str, *, write: bool, truncate: bool = False
    ) -> list[asyncssh.SFTPClientFile]:
        """``path`` opened on every channel (binary, one request per call); creates it for writing.

        The channels open it at once (one round trip, not one per channel): each may create the
        file, and only the first truncates it; no data is written before all are open.
        """
        first = (
            asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | (asyncssh.FXF_TRUNC if truncate else 0)
            if write
            else asyncssh.FXF_READ
        )
        rest = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT if write else asyncssh.FXF_READ
        opened = await asyncio.gather(
            *(
                channel.open(path, rest if index else first, encoding=None, block_size=0)
                for index, channel in enumerate(self.channels)
            ),
            return_exceptions=True,
        )
        handles = [h for h in opened if isinstance(h, asyncssh.SFTPClientFile)]
        errors = [e for e in opened if isinstance(e, BaseException)]
        if errors:
            await close_quietly(handles)
            with self.translate("write" if write else "read", path):
                raise errors[0]
        return handles

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


async def shell_stdout(conn: asyncssh.SSHClientConnection, options: TransferOptions) -> bytes:
    """What the login shell prints on stdout around ``true`` (which prints nothing itself): the
    bytes that an SFTP server started through that shell would find in front of its replies."""
    try:
        result = await conn.run(
            "true",
            check=False,
            timeout=min(options.command_timeout, 60),
            encoding=None,
            stdin=asyncssh.DEVNULL,
        )
    except (*LINK_ERRORS, asyncssh.Error) as error:
        log.debug("cannot run `true` to look for shell output: %s: %s", type(error).__name__, error)
        return b""
    return bytes(result.stdout or b"")


async def close_quietly(handles: list[asyncssh.SFTPClientFile]) -> None:
    """Closes remote file handles; when the link is gone they went with it, so errors are moot."""

    async def close(handle: asyncssh.SFTPClientFile) -> None:
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            await asyncio.wait_for(handle.close(), 10)

    await asyncio.gather(*(close(handle) for handle in handles))  # one round trip for all


class GrowingHash:
    """Hashes a file on the facility while it is being written.

    A ``python3`` process there reads the file up to each offset that ``advance`` reports as
    complete, so the digest is ready moments after the last write. It starts in the background
    (data flows meanwhile); without python3 on the facility, ``finish`` hashes the whole file
    with the session's hashing command instead.
    """

    def __init__(self, session: FacilitySession, path: str):
        self._session = session
        self._path = path
        self._latest: int | None = None
        self._process: asyncssh.SSHClientProcess | None = None
        self._command: FramedCommand | None = None
        self._starting = asyncio.ensure_future(self._start())

    async def _start(self) -> asyncssh.SSHClientProcess | None:
        if not (await self._session.hash_tools()).python3:
            return None
        self._command = FramedCommand(commands.build_growing_hash(self._path))
        with self._session.translate("hash", self._path):
            self._process = await self._session.conn.create_process(
                self._command.text, encoding=None
            )
        if self._latest is not None:
            self.advance(self._latest)
        return self._process

    def advance(self, offset: int) -> None:
        """The file is complete up to ``offset``."""
        self._latest = offset
        if self._process is not None and not self._process.stdin.is_closing():
            self._process.stdin.write(f"{offset}\n".encode())

    async def finish(self, size: int) -> str:
        """The sha256 of the file, which has ``size`` bytes and is complete."""
        session, path = self._session, self._path
        process = await self._starting
        if process is None:
            return await session.sha256(path)
        limit = session.options.command_timeout
        assert self._command is not None
        with session.translate("hash", path):
            process.stdin.write(f"{size}\n".encode())
            process.stdin.write_eof()
            try:
                result = await process.wait(timeout=limit)
            except asyncssh.TimeoutError:
                raise RetryableFailure(
                    timeout_message(
                        session.facility.name, f"python3 -c <sha256 as it grows> {path}", limit
                    )
                ) from None
        if result.exit_status is None:
            raise RetryableFailure(
                f"the hasher of {path} ended without status (signal {result.exit_signal})"
            )
        output = read_result(
            session.facility.name, self._command, result.stdout, result.stderr,
            result.exit_status, result.exit_signal, action="hash", path=path,
        )  # fmt: skip
        try:
            return commands.parse_growing_hash(output, size, path)
        except ValueError as error:
            raise TransferError(session.facility.name, str(error), path=path) from None

    async def abort(self) -> None:
        self._starting.cancel()
        await asyncio.gather(self._starting, return_exceptions=True)
        if self._process is not None:
            self._process.close()
