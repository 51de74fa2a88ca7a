"""``SlurmHook``: Slurm at one facility, for operators (sync) and triggers (async).

It looks the facility up by its SSH connection id (host key pinned, see ``xffl_airflow.ssh``),
keeps one connection for its lifetime and runs each operation through a ``SlurmClient``
(``slurm_client``: framing, login environment, errors), offering it both async (``a...``) and
sync.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Self, TypeVar

import asyncssh
from airflow.sdk import BaseHook

from xffl_airflow.hooks.slurm_client import (
    DEFAULT_COMMAND_TIMEOUT,
    QueryResult,
    SlurmClient,
    SlurmCommandError,
    SlurmSubmitError,
    SlurmSubmitUnknown,
    remote_command_count,
)
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.states import SlurmJob
from xffl_airflow.ssh import FacilityConnectionError, SSHTarget, aget_target, connect, get_target

T = TypeVar("T")


class _LoopThread:
    """A private event loop in a thread: the sync side of the hook runs its coroutines there, so
    it works whether or not the caller's thread already runs a loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="slurm-hook-loop", daemon=True
        )
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SlurmHook(BaseHook):
    """Slurm at one facility, reached over the Airflow SSH connection ``ssh_conn_id``.

    One SSH connection is opened on first use and kept until ``close()`` (or the end of a
    ``with`` / ``async with`` block). Async methods are for triggers; the sync ones (same names
    without the ``a``) for operators.

    :param ssh_conn_id: the facility's Airflow SSH connection (host key pinned).
    :param command_timeout: seconds one remote command may take.
    :param login: the facility's login environment (``FacilityLogin``: shell lines run before
        every Slurm command, the folder of the Slurm commands), validated when it was made.
    """

    conn_name_attr = "ssh_conn_id"
    default_conn_name = "ssh_default"
    conn_type = "ssh"
    hook_name = "Slurm over SSH"

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        login: FacilityLogin | None = None,
    ):
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.command_timeout = command_timeout
        self.login = login or FacilityLogin()
        self._target: SSHTarget | None = None
        self._connection: asyncssh.SSHClientConnection | None = None
        self._client: SlurmClient | None = None
        self._thread: _LoopThread | None = None

    # -- connection ---------------------------------------------------------------------

    async def aget_client(self) -> SlurmClient:
        if self._client is None:
            target = self._target or await aget_target(self.ssh_conn_id)
            self._connection = await connect(target)
            self._client = SlurmClient(
                self.ssh_conn_id,
                self._connection,
                command_timeout=self.command_timeout,
                login=self.login,
            )
        return self._client

    async def aclose(self) -> None:
        connection, self._connection, self._client = self._connection, None, None
        if connection is not None:
            connection.close()
            try:
                async with asyncio.timeout(5):
                    await connection.wait_closed()
            except (TimeoutError, OSError, asyncssh.Error):
                pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def get_conn(self) -> SlurmClient:
        """The open ``SlurmClient`` (sync callers: prefer the hook's own methods)."""
        return self._sync(self.aget_client())

    def _sync(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._thread is None:
            try:
                # Look the connection up here, in the caller's thread (the task's SDK context).
                self._target = self._target or get_target(self.ssh_conn_id)
            except BaseException:
                coroutine.close()
                raise
            self._thread = _LoopThread()
        return self._thread.run(coroutine)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.run(self.aclose())
            self._thread.close()
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        client = await self.aget_client()
        try:
            return await getattr(client, name)(*args, **kwargs)
        except SlurmCommandError as error:
            if error.retryable:  # the link may be dead: reconnect on the next call
                await self.aclose()
            raise

    # -- operations (async) -------------------------------------------------------------

    async def aresolve_workdir(self, workdir: str) -> str:
        return await self._call("resolve_workdir", workdir)

    async def asubmit(
        self, script: str, *, workdir: str, script_name: str
    ) -> tuple[str, str | None]:
        return await self._call("submit", script, workdir=workdir, script_name=script_name)

    async def aquery(
        self, job_ids: Sequence[str], end_records: Mapping[str, str] | None = None
    ) -> QueryResult:
        return await self._call("query", list(job_ids), end_records)

    async def afind_tagged(
        self, job_name: str, comment: str | None
    ) -> tuple[str | None, list[SlurmJob]]:
        return await self._call("find_tagged", job_name, comment)

    async def acancel(self, job_id: str) -> None:
        await self._call("cancel", job_id)

    async def alog_tail(self, job_id: str, log_path: str, lines: int) -> list[str]:
        return (await self._call("log_tails", [(job_id, log_path)], lines)).get(job_id, [])

    # -- operations (sync) --------------------------------------------------------------

    def resolve_workdir(self, workdir: str) -> str:
        return self._sync(self.aresolve_workdir(workdir))

    def submit(self, script: str, *, workdir: str, script_name: str) -> tuple[str, str | None]:
        return self._sync(self.asubmit(script, workdir=workdir, script_name=script_name))

    def query(
        self, job_ids: Sequence[str], end_records: Mapping[str, str] | None = None
    ) -> QueryResult:
        return self._sync(self.aquery(job_ids, end_records))

    def find_tagged(self, job_name: str, comment: str | None) -> tuple[str | None, list[SlurmJob]]:
        return self._sync(self.afind_tagged(job_name, comment))

    def cancel(self, job_id: str) -> None:
        self._sync(self.acancel(job_id))

    def log_tail(self, job_id: str, log_path: str, lines: int) -> list[str]:
        return self._sync(self.alog_tail(job_id, log_path, lines))


__all__ = [
    "FacilityConnectionError",
    "QueryResult",
    "SlurmClient",
    "SlurmCommandError",
    "SlurmHook",
    "SlurmSubmitError",
    "SlurmSubmitUnknown",
    "remote_command_count",
]
