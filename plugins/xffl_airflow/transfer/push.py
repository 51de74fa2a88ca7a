"""Push: a local model folder to a folder in a facility's workdir.

Each file goes to ``.NAME.xffl-part`` beside its final name, is hashed by ``sha256sum`` on the
facility, and is renamed over the final name only when that matches the sha256 computed while
reading it here. A file whose final copy already hashes alike is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import stat

import asyncssh

from xffl_airflow.transfer.errors import TransferError
from xffl_airflow.transfer.facility import part_path
from xffl_airflow.transfer.local import LocalFile, sha256_file
from xffl_airflow.transfer.runner import TransferRun, run_all
from xffl_airflow.transfer.session import FacilitySession, close_quietly
from xffl_airflow.transfer.streams import SourceChanged, send_file

log = logging.getLogger(__name__)


class PushRun(TransferRun):
    """Sends ``files`` (scanned from ``local_dir``) to ``remote_dir`` on the facility."""

    direction = "push"

    def __init__(self, *, files: list[LocalFile], **kwargs):
        super().__init__(**kwargs)
        self.files = files
        self.report.bytes_total = sum(f.size for f in files)

    def final_path(self, item: LocalFile) -> str:
        return posixpath.join(self.remote_dir, item.relative)

    async def attempt(self, session: FacilitySession) -> None:
        todo = [f for f in self.files if f.relative not in self.report.files]
        for folder in sorted(
            {self.remote_dir} | {posixpath.dirname(self.final_path(f)) for f in todo}
        ):
            await session.make_dirs(folder)
        # the free space is asked while the files are inspected: a round trip less
        free = asyncio.ensure_future(session.free_bytes(self.remote_dir))
        try:
            inspected = await run_all(
                [lambda f=f: self.inspect(session, f) for f in todo], self.options.max_files
            )
            to_send = [(f, part) for f, (skip, part) in zip(todo, inspected) if not skip]
            self.start_progress(sum(f.size for f, _ in to_send))
            self.check_space(to_send, await free)
        finally:
            free.cancel()
            await asyncio.gather(free, return_exceptions=True)
        await run_all(
            [lambda f=f, part=part: self.push_file(session, f, part_absent=part is None)
             for f, part in to_send],
            self.options.max_files,
        )  # fmt: skip

    async def inspect(self, session: FacilitySession, item: LocalFile) -> tuple[bool, int | None]:
        """Whether the facility already holds this file (same sha256), and the size of its
        unfinished copy (None: nothing under the temporary name)."""
        final = self.final_path(item)
        part, attrs = await asyncio.gather(  # one round trip, not two
            session.lstat(part_path(final)), session.lstat(final)
        )
        part_size = (
            None if part is None else (part.size or 0) if stat.S_ISREG(part.permissions or 0) else 0
        )
        if attrs is None:
            return False, part_size
        if stat.S_ISLNK(attrs.permissions or 0):
            await session.confine(final)
            attrs = await session.stat(final)
        if stat.S_ISDIR(attrs.permissions or 0):
            raise TransferError(
                self.facility.name, f"{final} is a folder, where {item.path} should go", path=final
            )
        if not self.options.skip_unchanged or attrs.size != item.size:
            return False, part_size
        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(None, sha256_file, item.path, self.options.chunk_size)
        try:
            remote = await session.sha256(final)
        finally:
            digest = await local
        if remote != digest:
            log.info(
                "%s: %s differs there (sha256 %s there, %s here): sending it",
                self.label,
                item.relative,
                remote,
                digest,
            )
            return False, part_size
        self.report.files[item.relative] = digest
        self.report.files_skipped += 1
        self.report.bytes_skipped += item.size
        log.info("%s: %s is already there (sha256 %s): skipped", self.label, item.relative, digest)
        if part is not None:
            await session.remove(part_path(final))  # an unfinished copy of what is already there
        return True, 0

    def check_space(self, to_send: list[tuple[LocalFile, int | None]], free: int | None) -> None:
        need = sum(max(0, f.size - (part or 0)) for f, part in to_send)
        if free is not None and free < need:
            raise TransferError(
                self.facility.name,
                f"not enough space at {self.remote_dir}: {need} bytes to write, {free} free",
                path=self.remote_dir,
            )

    async def push_file(
        self, session: FacilitySession, item: LocalFile, *, part_absent: bool = False
    ) -> None:
        """``part_absent``: the inspection just found no unfinished copy (no need to look again)."""
        final = self.final_path(item)
        part = part_path(final)
        for sending in range(self.options.retries + 1):
            if sending == 0 and part_absent:
                start, digest = 0, self.fresh_digest()
            else:
                start, digest = await self.resume_point(session, item, part)
            self.restart_at(item.relative, start)
            theirs = await self.send(session, item, part, start, digest)
            ours = digest.hexdigest()
            if theirs == ours:
                await session.replace(part, final)
                self.report.files[item.relative] = ours
                log.info(
                    "%s: %s verified (sha256 %s) and in place", self.label, item.relative, ours
                )
                return
            self.report.retries += 1
            log.warning(
                "%s: %s arrived with sha256 %s, expected %s (try %d of %d); sending again from its verified prefix",
                self.label, item.relative, theirs, ours, sending + 1, self.options.retries + 1,
            )  # fmt: skip
        await session.remove(part)
        raise TransferError(
            self.facility.name,
            f"{final}: the copy still hashes differently after {self.options.retries + 1} tries "
            f"(sha256 {ours} here, {theirs} there)",
            path=final,
        )

    async def resume_point(
        self, session: FacilitySession, item: LocalFile, part: str
    ) -> tuple[int, object]:
        attrs = await session.lstat(part)
        if attrs is None:
            return 0, self.fresh_digest()
        if not stat.S_ISREG(attrs.permissions or 0):
            await session.remove(part)  # a symlink or other oddity under our name: never follow it
            return 0, self.fresh_digest()
        length = min(attrs.size or 0, item.size)
        if length == 0:
            return 0, self.fresh_digest()
        return await self.verified_prefix(session, item.path, part, length)

    async def send(
        self, session: FacilitySession, item: LocalFile, part: str, start: int, digest
    ) -> str:
        """Sends the file from ``start`` into ``part``; returns the sha256 the facility computed."""
        name = self.facility.name
        try:
            fd = os.open(item.path, os.O_RDONLY)
        except FileNotFoundError:
            raise TransferError(
                name, f"local file {item.path} vanished before it was sent", path=str(item.path)
            ) from None
        except OSError as error:
            raise TransferError(
                name, f"cannot read local file {item.path}: {error.strerror}", path=str(item.path)
            ) from None
        hasher = None
        finishing: asyncio.Future | None = None
        try:
            self.check_unchanged(fd, item, "since the folder was scanned")
            remotes = await session.open_file(part, write=True, truncate=start == 0)
            try:
                with session.translate("write", part):
                    try:
                        if start:
                            await remotes[0].truncate(start)  # drop the unverified tail
                        # the facility hashes the file as it lands, so verifying costs no extra time
                        hasher = session.growing_hash(part)
                        hasher.advance(start)
                        await send_file(
                            fd, remotes, start=start, size=item.size, digest=digest, block=session.write_block,
                            flow=self.flow(item.relative), settled=hasher.advance,
                        )  # fmt: skip
                        if self.options.fsync:
                            await remotes[0].fsync()
                        # every write is acknowledged: the digest is asked for while the
                        # handles close (a round trip less)
                        finishing = asyncio.ensure_future(hasher.finish(item.size))
                    except asyncssh.SFTPFailure as failure:
                        await self.explain_write_failure(session, part, item, failure.reason)
            except SourceChanged as error:
                raise TransferError(
                    name,
                    f"local file {item.path} changed while being sent: {error}",
                    path=str(item.path),
                ) from None
            finally:
                await close_quietly(remotes)
            self.check_unchanged(fd, item, "while being sent")
            assert finishing is not None
            theirs = await finishing
            hasher = None
            return theirs
        finally:
            if finishing is not None and not finishing.done():
                finishing.cancel()
            if finishing is not None:
                await asyncio.gather(finishing, return_exceptions=True)
            if hasher is not None:
                await hasher.abort()
            os.close(fd)

    def check_unchanged(self, fd: int, item: LocalFile, when: str) -> None:
        info = os.fstat(fd)
        if (info.st_size, info.st_mtime_ns) != (item.size, item.mtime_ns):
            raise TransferError(
                self.facility.name,
                f"local file {item.path} changed {when} ({info.st_size} bytes now, {item.size} before)",
                path=str(item.path),
            )

    async def explain_write_failure(
        self, session: FacilitySession, part: str, item: LocalFile, reason: str
    ) -> None:
        """A failed SFTP write is mostly a full disk or quota: say so, and free the space taken."""
        await session.remove(part)
        free = await session.free_bytes(posixpath.dirname(part))
        raise TransferError(
            self.facility.name,
            f"writing {part} failed ({reason or 'failure'}); {free if free is not None else 'unknown'} bytes free "
            f"there for the {item.size} bytes of {item.relative}: is the disk full or over quota?",
            path=self.final_path(item),
        )
