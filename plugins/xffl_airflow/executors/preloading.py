"""A LocalExecutor whose task processes start with the federation's modules already imported.

Every Airflow task runs in a process forked from a LocalExecutor worker, which was forked from
the scheduler. A task that imports torch pays about 2.5 s for it, and every task of the
federation DAG pays about 1 s for the DAG file's own imports (asyncssh, the Slurm operator, the
transfer), each time, on the round's critical path. This executor imports those modules once,
in the scheduler, just before it forks its workers: each task process then finds them in
``sys.modules`` and shares their memory copy-on-write.

    AIRFLOW__CORE__EXECUTOR=xffl_airflow.executors.preloading.PreloadingLocalExecutor
    AIRFLOW__XFFL__PRELOAD_MODULES=xffl_airflow.federation.dag,xffl_tasks.aggregate.aggregation  # optional

Importing is all it does: no model is loaded and no torch thread starts before the fork. A
module that fails to import is logged and skipped (the task imports it itself, as with the plain
LocalExecutor). Only the fork start method (Linux's default) inherits modules; with ``spawn``
it behaves exactly as ``LocalExecutor``. See docs/deployment.md.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Iterable

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

DEFAULT_PRELOAD = (
    "xffl_airflow.federation.dag",
    "xffl_airflow.federation.rounds.prepare",
    "xffl_airflow.federation.rounds.transfers",
    "xffl_airflow.federation.rounds.aggregate",
    "xffl_airflow.federation.rounds.finalize",
    "xffl_airflow.transfer",
    "xffl_tasks.aggregate.aggregation",
)
CONFIG_SECTION = "xffl"
CONFIG_KEY = "preload_modules"

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def parse_module_list(value: str) -> list[str]:
    """The module names of a comma-separated setting; ValueError naming a malformed one."""
    names = [part.strip() for part in value.split(",") if part.strip()]
    for name in names:
        if not _MODULE_NAME.fullmatch(name):
            raise ValueError(
                f"[{CONFIG_SECTION}] {CONFIG_KEY}: {name!r} is not a module name (dotted identifiers)"
            )
    return names


def preload(names: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Imports ``names``; returns those imported and, per failed one, why it failed."""
    loaded: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # any import-time failure: the task will meet it itself
            failed[name] = f"{type(error).__name__}: {error}"
        else:
            loaded.append(name)
    return loaded, failed


def configured_modules() -> list[str]:
    from airflow.configuration import conf

    value = conf.get(CONFIG_SECTION, CONFIG_KEY, fallback=",".join(DEFAULT_PRELOAD))
    return parse_module_list(value or "")


class PreloadingLocalExecutor(LocalExecutor):
    """``LocalExecutor`` that imports the configured modules before forking its workers."""

    def start(self) -> None:
        if self.is_mp_using_fork:
            started = time.monotonic()
            loaded, failed = preload(configured_modules())
            for name, reason in failed.items():
                log.warning(
                    "preloading %s failed (tasks will import it themselves): %s", name, reason
                )
            log.info(
                "preloaded %d module(s) for the task processes in %.1f s: %s",
                len(loaded), time.monotonic() - started, ", ".join(loaded) or "none",
            )  # fmt: skip
        else:
            log.info("multiprocessing does not fork here: nothing preloaded")
        super().start()
