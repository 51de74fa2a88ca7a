"""The REST API of a test bed's Airflow: tokens per user, calls, and waiting for DAGs and runs.

``AirflowApi`` is what ``AirflowInstance`` answers to once started: it needs only the
instance's ``base_url``, its users' ``passwords`` and its admin ``username``.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx


class AirflowError(RuntimeError):
    """An Airflow component or API call failed; the message says which and why."""


class AirflowApi:
    """Calls ``/api/v2`` of an Airflow as one of its users (the admin by default)."""

    base_url: str
    username: str
    passwords: dict[str, str]
    _tokens: dict[str, str]

    def token(self, user: str | None = None) -> str:
        """A JWT of ``user`` (default: the admin this instance was made with)."""
        user = user or self.username
        if user not in self._tokens:
            response = httpx.post(
                f"{self.base_url}/auth/token",
                json={"username": user, "password": self.passwords[user]},
                timeout=30,
            )
            if response.status_code not in (200, 201):
                raise AirflowError(f"login as {user} failed: {response.status_code} {response.text}")
            self._tokens[user] = response.json()["access_token"]
        return self._tokens[user]

    def api(self, method: str, path: str, *, headers: dict | None = None, user: str | None = None, **kwargs) -> dict:
        """Calls ``/api/v2/<path>`` as ``user`` (default: the admin) and returns the JSON answer;
        raises on an error status."""
        response = httpx.request(
            method,
            f"{self.base_url}/api/v2/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {self.token(user)}", **(headers or {})},
            timeout=60,
            **kwargs,
        )
        if response.status_code >= 400:
            raise AirflowError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else {}

    def import_errors(self, dag_file: str | Path | None = None) -> list[str]:
        """The dag-processor's import errors (stack traces): all, or those of one DAG file."""
        errors = self.api("GET", "importErrors", params={"limit": 1000}).get("import_errors", [])
        if dag_file is not None:
            name = Path(dag_file).name
            errors = [e for e in errors if Path(e["filename"]).name == name]
        return [e["stack_trace"] for e in errors]

    def wait_for_dag(
        self, dag_id: str, *, timeout: float = 120, dag_file: str | Path | None = None
    ) -> dict:
        """Waits until the dag-processor has parsed ``dag_id``; raises with the import errors of
        ``dag_file`` when given (other files' errors are theirs), else with any import error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.import_errors(dag_file)
            if errors:
                raise AirflowError("DAG import errors:\n" + "\n".join(e[-2000:] for e in errors))
            try:
                return self.api("GET", f"dags/{dag_id}")
            except AirflowError as error:
                if " 404 " not in str(error):
                    raise
            time.sleep(1)
        raise AirflowError(
            f"DAG {dag_id} not parsed after {timeout:.0f} s; see {self.home}/logs/dag-processor.out"
        )

    def remove_dag_file(self, dag_file: str | Path, dag_id: str, *, timeout: float = 180) -> None:
        """Removes a DAG file and waits until the dag-processor has taken the removal in: the DAG
        is stale (or was never parsed) and no import error names the file.

        "No import error" alone can be read too early: a parse under way when the file goes
        fails on the missing file and records an error a few seconds later; the next refresh of
        the folder clears it and marks the DAG stale in the same pass.
        """
        Path(dag_file).unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                stale = bool(self.api("GET", f"dags/{dag_id}").get("is_stale"))
            except AirflowError as error:
                if " 404 " not in str(error):
                    raise
                stale = True
            if stale and not self.import_errors(dag_file):
                return
            if time.monotonic() > deadline:
                raise AirflowError(
                    f"removal of {Path(dag_file).name} not taken in by the dag-processor after "
                    f"{timeout:.0f} s; see {self.home}/logs/dag-processor.out"
                )
            time.sleep(1)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, *, conf: dict | None = None, run_id: str | None = None) -> str:
        body: dict = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.api(
            "GET", f"dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"}
        )["dag_runs"]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_run(
        self, dag_id: str, run_id: str, *, timeout: float = 600, poll: float = 1.0
    ) -> str:
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
        """Every task instance of the run, page after page (the API caps a page at
        ``[api] maximum_page_limit``, 100 by default: a 32-facility round has more)."""
        found: list[dict] = []
        while True:
            page = self.api(
                "GET",
                f"dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(found)},
            )
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page.get("total_entries", 0):
                return found

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1
    ) -> str:
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
