"""A small DAG for the Airflow test bed: a deferring sensor, then a task that reaches a facility
over the connection that docker/facility/up wrote (host key pinned)."""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import dag, task


@dag(dag_id="xffl_smoke", schedule=None, catchup=False, tags=["xffl-test"])
def xffl_smoke():
    wait = TimeDeltaSensor(task_id="wait", delta=timedelta(seconds=3), deferrable=True)

    @task
    def whoami() -> str:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        hook = SSHHook(ssh_conn_id="facility_site1")
        with hook.get_conn() as client:
            code, out, err = hook.exec_ssh_client_command(client, "id -un", get_pty=False, environment=None)
        if code != 0:
            raise RuntimeError(err.decode())
        return out.decode().strip()

    wait >> whoami()


xffl_smoke()
