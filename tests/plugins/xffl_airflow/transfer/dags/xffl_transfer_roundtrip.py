"""A DAG for the transfer tests: a worker task pushes a model folder to facility site1, the
next pulls it back. The folders come in the run's conf; the reports go to XCom."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(dag_id="xffl_transfer_roundtrip", schedule=None, catchup=False, tags=["xffl-test"])
def xffl_transfer_roundtrip():
    @task
    def push_model(**context) -> dict:
        from pathlib import Path

        from xffl_airflow.transfer import RemoteFacility, push

        conf = context["dag_run"].conf
        site = RemoteFacility(name="site1", conn_id="facility_site1", workdir=conf["workdir"])
        return push(
            Path(conf["model_dir"]), site, conf["remote_dir"], progress_interval=0.2, max_mbps=40
        ).to_dict()

    @task
    def pull_model(pushed: dict, **context) -> dict:
        from pathlib import Path

        from xffl_airflow.transfer import RemoteFacility, pull

        conf = context["dag_run"].conf
        site = RemoteFacility(name="site1", conn_id="facility_site1", workdir=conf["workdir"])
        report = pull(
            site, conf["remote_dir"], Path(conf["back_dir"]), progress_interval=0.2, max_mbps=40
        )
        if report.files != pushed["files"]:
            raise ValueError(f"pulled {report.files}, pushed {pushed['files']}")
        return report.to_dict()

    pull_model(push_model())


xffl_transfer_roundtrip()
