"""Verified, atomic, resumable model transfer to and from a facility over SFTP.

    from xffl_airflow.transfer import RemoteFacility, push, pull

    site = RemoteFacility(name="site1", conn_id="facility_site1", workdir="/scratch/xffl")
    report = push(Path("/models/global-r3"), site, "round-3/global")
    report = pull(site, "round-3/trained", Path("/models/site1-r3"),
                  budget=PullBudget.for_model(Path("/models/global-r3"), adapter=False))
    report.to_dict()  # JSON-safe: per-file sha256, bytes sent/skipped/resumed, MB/s, retries

Both calls are synchronous (they run their own event loop) and meant for worker tasks, never
for the triggerer. Keyword arguments tune the transfer (``TransferOptions``). See
docs/transfer.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from xffl_airflow.ssh import FacilityConnectionError, SSHTarget, get_target
from xffl_airflow.transfer.budget import FileAllowance, PullBudget, PullRefused, check_listing
from xffl_airflow.transfer.errors import TransferError
from xffl_airflow.transfer.facility import RemoteFacility
from xffl_airflow.transfer.local import scan_folder
from xffl_airflow.transfer.options import TransferOptions
from xffl_airflow.transfer.pull import PullRun
from xffl_airflow.transfer.push import PushRun
from xffl_airflow.transfer.report import TransferReport

__all__ = [
    "FileAllowance", "PullBudget", "PullRefused", "RemoteFacility", "TransferError",
    "TransferOptions", "TransferReport", "check_listing", "pull", "push",
]  # fmt: skip

T = TypeVar("T")


def push(
    local_dir: Path, facility: RemoteFacility, remote_dir: str, **tuning: Any
) -> TransferReport:
    """Copies the model folder ``local_dir`` to ``remote_dir`` on ``facility``.

    ``remote_dir`` is relative to the facility's workdir (or absolute inside it); it is created
    if missing. Every file is verified by sha256 on the facility before it takes its final
    name; files already there with the same sha256 are skipped; an interrupted file resumes.
    Raises ``TransferError`` naming the facility and path.
    """
    options = TransferOptions.from_tuning(tuning)
    local = Path(local_dir)
    remote = facility.resolve(remote_dir)
    try:
        files = scan_folder(local)
    except ValueError as error:
        raise TransferError(facility.name, f"cannot push: {error}", path=str(local)) from None
    run = PushRun(
        files=files,
        facility=facility,
        target=_target(facility),
        options=options,
        local_dir=local,
        remote_dir=remote,
    )
    return _run_sync(run.run())


def pull(
    facility: RemoteFacility,
    remote_dir: str,
    local_dir: Path,
    *,
    budget: PullBudget | None = None,
    **tuning: Any,
) -> TransferReport:
    """Copies the folder ``remote_dir`` on ``facility`` into the local folder ``local_dir``.

    ``remote_dir`` is relative to the facility's workdir (or absolute inside it); symlinks in
    it must resolve inside the workdir. ``local_dir`` is created if missing. Every file is
    verified against ``sha256sum`` on the facility before it takes its final name; local files
    with the same sha256 are skipped; an interrupted file resumes. Raises ``TransferError``.

    ``budget`` (``PullBudget``; what a facility sends is untrusted, so a caller that pulls its
    outputs passes one) bounds which files come, each one's size, their count and total: the
    remote listing is checked before anything is written, and an excess raises ``PullRefused``
    (a ``TransferError``, not retryable) naming the facility, the file and the limit.
    """
    options = TransferOptions.from_tuning(tuning)
    remote = facility.resolve(remote_dir)
    local = Path(local_dir)
    try:
        if budget is None:  # with a budget, the folder appears once the listing fits it
            local.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TransferError(
            facility.name, f"cannot create local folder {local}: {error.strerror}", path=str(local)
        ) from None
    run = PullRun(
        budget=budget,
        facility=facility,
        target=_target(facility),
        options=options,
        local_dir=local,
        remote_dir=remote,
    )
    return _run_sync(run.run())


def _target(facility: RemoteFacility) -> SSHTarget:
    try:
        return get_target(facility.conn_id)
    except FacilityConnectionError as error:
        raise TransferError(facility.name, str(error)) from None


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs ``coroutine`` to the end: here, or in a thread of its own when this thread already
    runs an event loop (asyncio.run refuses to nest)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xffl-transfer") as pool:
        return pool.submit(asyncio.run, coroutine).result()
