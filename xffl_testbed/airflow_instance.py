"""A real Airflow for tests and the demo: api-server, scheduler, dag-processor and triggerer,
each an ``airflow`` process of its own, started in its own session and stopped by PID.

The embedded default is SQLite with the LocalExecutor; pass ``sql_alchemy_conn`` for another
metadata database. Ports are picked free, so two instances on one machine never meet.
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

from xffl_testbed.processes import terminate, with_descendants

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

# Round latency settings measured on a 2-core machine (docs/airflow-latency.md): the idle
# sleep of 0.2 s gave the same round overhead as 0.05 s at a sixth of the idle CPU.
LATENCY_SETTINGS = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
    "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "0",
    "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
}
# The LocalExecutor whose task processes fork with torch and the DAG's imports already loaded
# (docs/deployment.md): 0.5 to 3 s less per task.
EXECUTOR = "xffl_airflow.executors.preloading.PreloadingLocalExecutor"


class AirflowError(RuntimeError):
    """An Airflow component or API call failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowInstance:
    """An Airflow home with its own database, ports and processes.

    :param home: the AIRFLOW_HOME (created if missing); logs and PIDs live there too.
    :param dags_folder: the folder the dag-processor reads.
    :param env: extra environment (connections, settings) for every component.
    :param sql_alchemy_conn: metadata database URL; default a SQLite file in ``home``.
    :param parallelism: ``[core] parallelism``, LocalExecutor worker processes.
    :param latency: apply ``LATENCY_SETTINGS``.
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
    ):
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.dags_folder = Path(dags_folder).resolve()
        self.api_port = free_port()
        self.username = username
        self.password = secrets.token_urlsafe(12)
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{self.home / 'airflow.db'}"
        self.processes: dict[str, subprocess.Popen] = {}
        self._token: str | None = None
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({username: self.password}))
        passwords.chmod(0o600)
        bin_dir = str(Path(sys.executable).parent)
        # This checkout's code first (plugins/ holds xffl_airflow), whatever the venv points at.
        pythonpath = [str(REPO / "plugins"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
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
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "PYTHONUNBUFFERED": "1",
        }
        if latency:
            self.env.update(LATENCY_SETTINGS)
        self.env.update(env or {})

    # -- lifecycle -------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Runs one ``airflow`` CLI command against this instance."""
        result = subprocess.run(
            [self._airflow_bin(), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AirflowError(f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    def migrate(self) -> None:
        self.airflow("db", "migrate")

    def start(self, components: tuple[str, ...] = COMPONENTS, *, timeout: float = 120) -> None:
        for component in components:
            self.start_component(component)
        self.wait_until_healthy(timeout=timeout)

    def start_component(self, component: str) -> int:
        if component not in COMPONENTS:
            raise ValueError(f"unknown Airflow component {component!r}; one of {COMPONENTS}")
        if component in self.processes and self.processes[component].poll() is None:
            raise AirflowError(f"{component} already runs (PID {self.processes[component].pid})")
        args = [component]
        if component == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        log = open(self.home / "logs" / f"{component}.out", "ab")
        process = subprocess.Popen(
            [self._airflow_bin(), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[component] = process
        self._write_pids()
        return process.pid

    def stop_component(self, component: str, *, sig: int = signal.SIGTERM, grace: float = 20) -> None:
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
                    if all(health.get(c, {}).get("status") == "healthy" for c in wanted):
                        return
                    last = json.dumps(health)
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.5)
        raise AirflowError(f"Airflow not healthy after {timeout:.0f} s: {last}")

    def component_log(self, component: str) -> str:
        path = self.home / "logs" / f"{component}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- REST API --------------------------------------------------------------------------

    def token(self) -> str:
        if self._token is None:
            response = httpx.post(
                f"{self.base_url}/auth/token",
                json={"username": self.username, "password": self.password},
                timeout=30,
            )
            if response.status_code not in (200, 201):
                raise AirflowError(f"login as {self.username} failed: {response.status_code} {response.text}")
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, *, headers: dict | None = None, **kwargs) -> dict:
        """Calls ``/api/v2/<path>`` and returns the JSON answer; raises on an error status."""
        response = httpx.request(
            method,
            f"{self.base_url}/api/v2/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {self.token()}", **(headers or {})},
            timeout=60,
            **kwargs,
        )
        if response.status_code >= 400:
            raise AirflowError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else {}

    def wait_for_dag(self, dag_id: str, *, timeout: float = 120) -> dict:
        """Waits until the dag-processor has parsed ``dag_id``; raises with any import error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.api("GET", "importErrors").get("import_errors", [])
            if errors:
                raise AirflowError("DAG import errors:\n" + "\n".join(e["stack_trace"][-2000:] for e in errors))
            try:
                return self.api("GET", f"dags/{dag_id}")
            except AirflowError as error:
                if " 404 " not in str(error):
                    raise
            time.sleep(1)
        raise AirflowError(f"DAG {dag_id} not parsed after {timeout:.0f} s; see {self.home}/logs/dag-processor.out")

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, *, conf: dict | None = None, run_id: str | None = None) -> str:
        body: dict = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout: float = 600, poll: float = 1.0) -> str:
        """Waits for a run to end; returns its final state (``success`` or ``failed``)."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            state = self.dag_run(dag_id, run_id)["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise AirflowError(f"run {run_id} of {dag_id} still {state} after {timeout:.0f} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})[
            "task_instances"
        ]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        """The task's log as text (the trigger's part included)."""
        answer = self.api(
            "GET",
            f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "application/json"},
        )
        content = answer.get("content", [])
        if isinstance(content, str):
            return content
        lines = []
        for item in content:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            lines.append(str(item.get("event", "")))
            for detail in item.get("error_detail") or []:  # an exception's type and message
                lines.append(f"{detail.get('exc_type')}: {detail.get('exc_value')}")
        return "\n".join(lines)
