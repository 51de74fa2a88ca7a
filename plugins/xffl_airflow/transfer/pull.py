"""Pull: a folder in a facility's workdir to a local model folder.

Each file lands in ``.NAME.xffl-part`` beside its final local name while the facility hashes
its source with ``sha256sum`` (at the same time); it is renamed into place only when that
matches the sha256 computed here while receiving. A local file that already hashes alike is
skipped. Symlinks in the remote folder are followed only when they resolve inside the workdir.

With a ``PullBudget`` (``transfer.budget``), the listing is checked against it before anything
is written locally, and listing stops once the folder holds more entries than it allows: a
refused pull raises ``PullRefused`` and writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from xffl_airflow.transfer.budget import PullBudget, PullRefused, check_listing
from xffl_airflow.transfer.errors import TransferError
from xffl_airflow.transfer.facility import check_relative_name, is_part_name, part_path
from xffl_airflow.transfer.local import sha256_file
from xffl_airflow.transfer.runner import TransferRun, run_all
from xffl_airflow.transfer.session import FacilitySession, close_quietly
from xffl_airflow.transfer.streams import SourceChanged, receive_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """A regular file of the remote folder."""

    relative: str
    path: str
    size: int


class PullRun(TransferRun):
    """Fetches every file below ``remote_dir`` on the facility into ``local_dir``, within
    ``budget`` when one is given."""

    direction = "pull"

    def __init__(self, *, budget: PullBudget | None = None, **kwargs):
        super().__init__(**kwargs)
        self.budget = budget
        self.files: list[RemoteFile] | None = None
        self._listed = 0  # entries listed so far (files, folders, our temporary names)

    async def attempt(self, session: FacilitySession) -> None:
        if self.files is None:
            await session.confine(self.remote_dir)
            self._listed = 0
            files = await self.list_folder(session, self.remote_dir, "")
            if not files:
                raise TransferError(
                    self.facility.name,
                    f"remote folder {self.remote_dir} holds no files",
                    path=self.remote_dir,
                )
            if self.budget is not None:  # before anything is written here
                check_listing(
                    self.budget, [(f.relative, f.size) for f in files], facility=self.facility.name
                )
            self.files = files
            self.report.bytes_total = sum(f.size for f in self.files)
        todo = [f for f in self.files if f.relative not in self.report.files]
        for folder in sorted({self.final_path(f).parent for f in todo}):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TransferError(
                    self.facility.name,
                    f"cannot create local folder {folder}: {error.strerror}",
                    path=str(folder),
                ) from None
        skipped = await run_all(
            [lambda f=f: self.inspect(session, f) for f in todo], self.options.max_files
        )
        to_fetch = [f for f, skip in zip(todo, skipped) if not skip]
        self.start_progress(sum(f.size for f in to_fetch))
        self.check_space(to_fetch)
        await run_all(
            [lambda f=f: self.pull_file(session, f) for f in to_fetch], self.options.max_files
        )

    def final_path(self, item: RemoteFile) -> Path:
        return self.local_dir / item.relative

    def record_stat(self, relative: str, final: Path) -> None:
        """Records the verified file's size and mtime: its sha256 holds while they do."""
        info = final.stat()
        self.report.file_stats[relative] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}

    async def list_folder(
        self, session: FacilitySession, folder: str, prefix: str
    ) -> list[RemoteFile]:
        with session.translate("list", folder):
            entries = []
            async for entry in session.sftp.scandir(folder):
                if str(entry.filename) not in (".", ".."):
                    self._count_entry(folder)
                entries.append(entry)
        files: list[RemoteFile] = []
        for entry in sorted(entries, key=lambda e: str(e.filename)):
            name = str(entry.filename)
            if name in (".", "..") or is_part_name(name):
                continue
            path = posixpath.join(folder, name)
            relative = f"{prefix}{name}"
            # The listing is the facility's word: a name we could not hash, log or store as
            # one file is refused here, before anything is written locally.
            try:
                if "/" in name:
                    raise ValueError(f"file name {name!r} holds '/'")
                check_relative_name(relative)
            except ValueError as error:
                raise TransferError(
                    self.facility.name,
                    f"the listing of {folder!r} holds an unusable name: {error}",
                    path=path,
                ) from None
            attrs = entry.attrs
            mode = attrs.permissions or 0
            if stat.S_ISLNK(mode):
                await session.confine(path)
                attrs = await session.stat(path)
                mode = attrs.permissions or 0
                if stat.S_ISDIR(mode):
                    raise TransferError(
                        self.facility.name,
                        f"{path} is a symlink to a folder: not followed",
                        path=path,
                    )
            if stat.S_ISDIR(mode):
                files += await self.list_folder(session, path, relative + "/")
            elif stat.S_ISREG(mode):
                files.append(RemoteFile(relative, path, attrs.size or 0))
            else:
                raise TransferError(self.facility.name, f"{path} is not a regular file", path=path)
        return files

    def _count_entry(self, folder: str) -> None:
        """Stops listing a folder that holds more than the budget allows (a facility may list
        millions of names): each entry but ``.`` and ``..`` counts."""
        self._listed += 1
        if self.budget is not None and self._listed > self.budget.max_files:
            raise PullRefused(
                self.facility.name,
                f"the remote folder {self.remote_dir} holds more than the {self.budget.max_files} "
                "files the pull allows (max_files; listing stopped)",
                file=None, limit=self.budget.max_files, path=folder,
            )  # fmt: skip

    async def inspect(self, session: FacilitySession, item: RemoteFile) -> bool:
        """Whether the local folder already holds this file with the same sha256."""
        final = self.final_path(item)
        if (
            not self.options.skip_unchanged
            or not final.is_file()
            or final.stat().st_size != item.size
        ):
            return False
        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(None, sha256_file, final, self.options.chunk_size)
        try:
            remote = await session.sha256(item.path)
        finally:
            digest = await local
        if remote != digest:
            log.info(
                "%s: %s differs here (sha256 %s here, %s there): fetching it",
                self.label,
                item.relative,
                digest,
                remote,
            )
            return False
        self.report.files[item.relative] = digest
        self.record_stat(item.relative, final)
        self.report.files_skipped += 1
        self.report.bytes_skipped += item.size
        log.info("%s: %s is already here (sha256 %s): skipped", self.label, item.relative, digest)
        Path(part_path(str(final))).unlink(missing_ok=True)  # an unfinished copy of it
        return True

    def check_space(self, to_fetch: list[RemoteFile]) -> None:
        need = 0
        for item in to_fetch:
            part = Path(part_path(str(self.final_path(item))))
            need += max(0, item.size - (part.stat().st_size if part.is_file() else 0))
        free = shutil.disk_usage(self.local_dir).free
        if need > free:
            raise TransferError(
                self.facility.name,
                f"not enough space at local {self.local_dir}: {need} bytes to write, {free} free",
                path=str(self.local_dir),
            )

    async def pull_file(self, session: FacilitySession, item: RemoteFile) -> None:
        final = self.final_path(item)
        part = Path(part_path(str(final)))
        theirs_task: asyncio.Future | None = None
        try:
            for fetching in range(self.options.retries + 1):
                # the facility hashes its copy while we fetch it
                theirs_task = asyncio.ensure_future(session.sha256(item.path))
                start, digest = await self.resume_point(session, item, part)
                self.restart_at(item.relative, start)
                await self.receive(session, item, part, start, digest)
                theirs = await theirs_task
                ours = digest.hexdigest()
                if theirs == ours:
                    try:
                        os.replace(part, final)
                    except OSError as error:
                        raise TransferError(
                            self.facility.name,
                            f"cannot put {part} in place as {final}: {error.strerror}",
                            path=str(final),
                        ) from None
                    self.report.files[item.relative] = ours
                    self.record_stat(item.relative, final)
                    log.info(
                        "%s: %s verified (sha256 %s) and in place", self.label, item.relative, ours
                    )
                    return
                self.report.retries += 1
                log.warning(
                    "%s: %s arrived with sha256 %s, the facility's copy has %s (try %d of %d); fetching again from its verified prefix",
                    self.label, item.relative, ours, theirs, fetching + 1, self.options.retries + 1,
                )  # fmt: skip
        finally:
            if theirs_task is not None and not theirs_task.done():
                theirs_task.cancel()
            if theirs_task is not None:
                await asyncio.gather(theirs_task, return_exceptions=True)
        part.unlink(missing_ok=True)
        raise TransferError(
            self.facility.name,
            f"{item.path}: the local copy still hashes differently after {self.options.retries + 1} tries "
            f"(sha256 {ours} here, {theirs} there)",
            path=item.path,
        )

    async def resume_point(
        self, session: FacilitySession, item: RemoteFile, part: Path
    ) -> tuple[int, object]:
        try:
            info = part.lstat()
        except FileNotFoundError:
            return 0, self.fresh_digest()
        if not stat.S_ISREG(info.st_mode):
            part.unlink()  # never write through a symlink under our name
            return 0, self.fresh_digest()
        length = min(info.st_size, item.size)
        if length == 0:
            return 0, self.fresh_digest()
        return await self.verified_prefix(session, part, item.path, length)

    async def receive(
        self, session: FacilitySession, item: RemoteFile, part: Path, start: int, digest
    ) -> None:
        name = self.facility.name
        remotes = await session.open_file(item.path, write=False)
        try:
            try:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError as error:
                raise TransferError(
                    name, f"cannot write local file {part}: {error.strerror}", path=str(part)
                ) from None
            try:
                os.ftruncate(fd, start)
                with session.translate("read", item.path):
                    await receive_file(
                        remotes,
                        fd,
                        start=start,
                        size=item.size,
                        digest=digest,
                        block=session.read_block,
                        flow=self.flow(item.relative),
                    )
                if self.options.fsync:
                    os.fsync(fd)
            except SourceChanged as error:
                raise TransferError(
                    name, f"{item.path} changed during the transfer: {error}", path=item.path
                ) from None
            except OSError as error:
                part.unlink(missing_ok=True)
                raise TransferError(
                    name, f"cannot write local file {part}: {error.strerror}", path=str(part)
                ) from None
            finally:
                os.close(fd)
        finally:
            await close_quietly(remotes)
