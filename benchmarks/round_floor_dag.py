"""Airflow's own floor for a federated round: the federation DAG's shape with no-op tasks.

prepare -> per facility [push -> train (defers 1 s in the triggerer) -> pull] -> aggregate
-> finalize -> continue? -> next round (NextRoundTriggerOperator), max_active_runs=1.
``benchmarks/round_overhead.py`` installs a copy of this file with the facility count and the
number of rounds filled in, and times its rounds beside those of the real DAG.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import DAG, BaseOperator, TaskGroup, get_current_context, task
from xffl_airflow.federation.next_round import NextRoundTriggerOperator

FACILITIES = 2  # replaced by the benchmark
ROUNDS = 3  # replaced by the benchmark


class DeferOneSecond(BaseOperator):
    """Stands in for training: defers to the triggerer for 1 s, holding no worker slot."""

    def execute(self, context):
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=1)), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return None


with DAG(
    dag_id=f"xffl_floor_{FACILITIES}",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
) as dag:

    @task
    def prepare() -> dict:
        return {"round": int(get_current_context()["params"].get("round", 0))}

    plan = prepare()
    pulls = []
    for index in range(FACILITIES):
        with TaskGroup(group_id=f"f{index}"):

            @task(task_id="push")
            def push(plan: dict) -> dict:
                return {}

            train = DeferOneSecond(task_id="train")

            @task(task_id="pull")
            def pull(plan: dict) -> dict:
                return {}

            pushed, pulled = push(plan), pull(plan)
            pushed >> train >> pulled
            pulls.append(pulled)

    @task(trigger_rule="all_done")
    def aggregate() -> dict:
        return {}

    @task
    def finalize(plan: dict, aggregated: dict) -> dict:
        return {"stop": plan["round"] + 1 >= ROUNDS, "next": {"round": plan["round"] + 1}}

    @task.short_circuit
    def continue_campaign(decision: dict) -> bool:
        return not decision["stop"]

    aggregated = aggregate()
    pulls >> aggregated
    decision = finalize(plan, aggregated)
    continue_campaign(decision) >> NextRoundTriggerOperator(
        task_id="next_round",
        trigger_dag_id=dag.dag_id,
        trigger_run_id="floor__round-{{ ti.xcom_pull(task_ids='finalize')['next']['round'] }}",
        conf="{{ ti.xcom_pull(task_ids='finalize')['next'] }}",
        skip_when_already_exists=True,
    )
