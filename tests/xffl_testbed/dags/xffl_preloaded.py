"""A DAG for the Airflow test bed whose task reports which heavy modules its process found
already imported: with the preloading executor, torch and the aggregation arrive with the fork."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(dag_id="xffl_preloaded", schedule=None, catchup=False, tags=["xffl-test"])
def xffl_preloaded():
    @task
    def modules_at_start() -> dict:
        import sys

        return {name: name in sys.modules for name in ("torch", "xffl_tasks.aggregate", "asyncssh")}

    modules_at_start()


xffl_preloaded()
