"""A real Airflow for tests and the demo: api-server, scheduler, dag-processor and triggerer,
each an ``airflow`` process of its own, started in its own session and stopped by PID.

The embedded default is SQLite with the preloading LocalExecutor; pass ``sql_alchemy_conn`` for
another metadata database. With ``executor="celery"`` (a PostgreSQL database and a Redis broker
needed) the instance also has Celery workers, ``celery-worker-1``, ``celery-worker-2``...,
each an ``airflow celery worker`` of its own with its own Celery node name and task hostname.
The settings every component shares come from ``docker/config/airflow.env``, the file the
compose deployment reads too (``xffl_testbed.airflow_settings``); the instance adds only what is
host-specific. Ports are picked free, so two instances on one machine never meet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from xffl_testbed.airflow_api import AirflowApi, AirflowError
from xffl_testbed.airflow_settings import load_settings
from xffl_testbed.processes import terminate, with_descendants

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
CELERY_WORKER = "celery-worker"
EXECUTORS = ("local", "celery")

# The shared settings (docker/config/airflow.env), by group.
SETTINGS = load_settings()
# Round latency settings measured on a 2-core machine (docs/airflow-latency.md).
LATENCY_SETTINGS = SETTINGS["latency"]
# The LocalExecutor whose task processes fork with torch and the DAG's imports already loaded
# (docs/deployment.md): 0.5 to 3 s less per task.
EXECUTOR = "xffl_airflow.executors.preloading.PreloadingLocalExecutor"
# ``[core] hostname_callable`` of the Celery workers: each records its own name as the task
# instance's hostname, so two workers on one machine can be told apart.
HOSTNAME_CALLABLE = "xffl_testbed.airflow_instance.component_hostname"


def component_hostname() -> str:
    """``<component>.<fqdn>`` in a component that sets ``XFFL_AIRFLOW_COMPONENT``, else the
    FQDN (what Airflow records by default)."""
    fqdn = socket.getfqdn()
    component = os.environ.get("XFFL_AIRFLOW_COMPONENT")
    return f"{component}.{fqdn}" if component else fqdn


def celery_worker_args(name: str, *, concurrency: int, pid_file: Path) -> list[str]:
    """The ``airflow`` arguments of one Celery worker: its own node name and PID file; no log
    server (its task logs are files in the instance's home, which the api-server reads), no
    gossip or start-up mingling between workers (CPU for nothing on a small machine)."""
    return [
        "celery", "worker",
        "--celery-hostname", f"{name}@%h",
        "--concurrency", str(concurrency),
        "--pid", str(pid_file),
        "--skip-serve-logs",
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowInstance(AirflowApi):
    """An Airflow home with its own database, ports and processes.

    :param home: the AIRFLOW_HOME (created if missing); logs and PIDs live there too.
    :param dags_folder: the folder the dag-processor reads.
    :param env: extra environment (connections, settings) for every component.
    :param sql_alchemy_conn: metadata database URL; default a SQLite file in ``home``.
    :param parallelism: ``[core] parallelism``, LocalExecutor worker processes.
    :param latency: apply ``LATENCY_SETTINGS``.
    :param executor: ``local`` (the preloading LocalExecutor) or ``celery`` (the CeleryExecutor
        with the shared ``executor``, ``workers`` and ``celery`` settings; needs a database
        other than SQLite and ``broker_url``).
    :param broker_url: the Celery broker (``xffl_testbed.redis_server.RedisServer.url``).
    :param celery_workers: how many Celery worker components (``celery-worker-1``...).
    :param worker_concurrency: task slots per Celery worker.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        dags_folder: str | Path,
        env: dict[str, str] | None = None,
        sql_alchemy_conn: str | None = None,
        parallelism: int = 8,
        latency: bool = True,
        username: str = "admin",
        executor: str = "local",
        broker_url: str | None = None,
        celery_workers: int = 2,
        worker_concurrency: int = 2,
        users: dict[str, str] | None = None,
    ):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if executor == "celery":
            if not broker_url:
                raise ValueError("executor 'celery' needs broker_url (a Redis URL)")
            if (sql_alchemy_conn or "sqlite").startswith("sqlite"):
                raise ValueError("executor 'celery' needs a metadata database other than SQLite")
            if celery_workers < 1 or worker_concurrency < 1:
                raise ValueError("celery_workers and worker_concurrency must be at least 1")
        self.executor = executor
        self.worker_concurrency = worker_concurrency
        workers = tuple(f"{CELERY_WORKER}-{n}" for n in range(1, celery_workers + 1))
        self.components = COMPONENTS + (workers if executor == "celery" else ())
        self._log_offsets: dict[str, int] = {}
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.dags_folder = Path(dags_folder).resolve()
        self.api_port = free_port()
        self.username = username
        self.password = secrets.token_urlsafe(12)
        # more users of the SimpleAuthManager, by name: their role (viewer, user, op, admin)
        self.users = {username: "admin", **(users or {})}
        self.passwords = {name: self.password if name == username else secrets.token_urlsafe(12) for name in self.users}
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{self.home / 'airflow.db'}"
        self.processes: dict[str, subprocess.Popen] = {}
        self._tokens: dict[str, str] = {}
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps(self.passwords))
        passwords.chmod(0o600)
        bin_dir = str(Path(sys.executable).parent)
        # This checkout's code first (plugins/ holds xffl_airflow), whatever the venv points at.
        pythonpath = [str(REPO / "plugins"), str(REPO)] + [
            p for p in os.environ.get("PYTHONPATH", "").split(":") if p
        ]
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": ":".join(pythonpath),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": EXECUTOR,
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{n}:{r}" for n, r in self.users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update(SETTINGS["common"])
        if executor == "celery":
            for group in ("executor", "workers", "celery"):
                self.env.update(SETTINGS[group])
            self.env.update(
                {
                    "AIRFLOW__CELERY__BROKER_URL": broker_url,
                    "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.sql_alchemy_conn}",
                    "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
                }
            )
        if latency:
            self.env.update(LATENCY_SETTINGS)
        self.env.update(env or {})

    # -- lifecycle -------------------------------------------------------------------------

    def airflow(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Runs one ``airflow`` CLI command against this instance."""
        result = subprocess.run(
            [self._airflow_bin(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AirflowError(
                f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        return result

    def migrate(self) -> None:
        self.airflow("db", "migrate")

    def start(self, components: tuple[str, ...] | None = None, *, timeout: float = 120) -> None:
        """Starts ``components`` (default: all of this instance's) and waits until healthy."""
        for component in self.components if components is None else components:
            self.start_component(component)
        self.wait_until_healthy(timeout=timeout)

    def start_component(self, component: str) -> int:
        if component not in self.components:
            raise ValueError(f"unknown Airflow component {component!r}; one of {self.components}")
        if component in self.processes and self.processes[component].poll() is None:
            raise AirflowError(f"{component} already runs (PID {self.processes[component].pid})")
        env = self.env
        if component.startswith(CELERY_WORKER):
            pid_file = self.home / f"{component}.pid"
            # not ours running (checked above): a PID file left by a killed worker is stale
            pid_file.unlink(missing_ok=True)
            args = celery_worker_args(
                component, concurrency=self.worker_concurrency, pid_file=pid_file
            )
            env = {
                **self.env,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
                "XFFL_AIRFLOW_COMPONENT": component,
            }
        else:
            args = [component]
        if component == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        log_path = self.home / "logs" / f"{component}.out"
        self._log_offsets[component] = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")
        process = subprocess.Popen(
            [self._airflow_bin(), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[component] = process
        self._write_pids()
        return process.pid

    def stop_component(
        self, component: str, *, sig: int = signal.SIGTERM, grace: float = 20
    ) -> None:
        """Stops one component and everything it started (its task processes too)."""
        process = self.processes.get(component)
        if process is None:
            return
        terminate([process.pid], grace=grace, sig=sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        del self.processes[component]
        self._write_pids()

    def stop(self) -> None:
        """Stops every component and every process below them, by PID."""
        pids = [p.pid for p in self.processes.values()]
        terminate(with_descendants(pids), grace=20)
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        self._write_pids()

    def restart_exited(self) -> list[str]:
        """Starts again every component whose process exited (what compose's restart policy or
        systemd does, e.g. after the metadata database came back); returns their names."""
        restarted = []
        for component, process in list(self.processes.items()):
            if process.poll() is not None:
                self.start_component(component)
                restarted.append(component)
        return restarted

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def all_pids(self) -> set[int]:
        """The components and every process below them (LocalExecutor workers, task runners)."""
        return with_descendants([p.pid for p in self.processes.values()])

    def __enter__(self) -> AirflowInstance:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _airflow_bin(self) -> str:
        candidate = Path(sys.executable).parent / "airflow"
        return str(candidate) if candidate.exists() else (shutil.which("airflow") or "airflow")

    def _write_pids(self) -> None:
        path = self.home / "pids.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.pids()))
        path.with_suffix(".tmp").replace(path)

    def wait_until_healthy(self, *, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AirflowError(
                        f"Airflow {name} exited with {process.returncode}; see {self.home}/logs/{name}.out:\n"
                        + self.component_log(name)[-3000:]
                    )
            try:
                response = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
                if response.status_code == 200:
                    health = response.json()
                    wanted = {"scheduler", "triggerer", "dag_processor"} & {
                        c.replace("-", "_") for c in self.processes
                    }
                    waiting = [
                        w
                        for w in self.processes
                        if w.startswith(CELERY_WORKER) and not self.worker_ready(w)
                    ]
                    if (
                        all(health.get(c, {}).get("status") == "healthy" for c in wanted)
                        and not waiting
                    ):
                        return
                    last = json.dumps(health) + (
                        f"; not ready: {', '.join(waiting)}" if waiting else ""
                    )
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.5)
        raise AirflowError(f"Airflow not healthy after {timeout:.0f} s: {last}")

    def component_log(self, component: str) -> str:
        path = self.home / "logs" / f"{component}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_ready(self, component: str) -> bool:
        """True once a Celery worker started by this instance logged that it is ready (since
        its latest start)."""
        path = self.home / "logs" / f"{component}.out"
        if not path.exists():
            return False
        with open(path, "rb") as f:
            f.seek(self._log_offsets.get(component, 0))
            since_start = f.read().decode(errors="replace")
        return f"{component}@" in since_start and " ready." in since_start
