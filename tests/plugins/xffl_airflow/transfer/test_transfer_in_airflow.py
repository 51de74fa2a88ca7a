"""Push and pull as Airflow worker tasks: the transfer runs in the task, its progress lands in
the task log, its report in XCom.

Starts: the session's ``airflow_instance`` (api-server, scheduler, dag-processor, triggerer)
and ``testbed`` (facilities site1 and site2); both stopped by PID at the end of the session.
The test's folder in site1's workdir is removed afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

DAG_FILE = Path(__file__).parent / "dags" / "xffl_transfer_roundtrip.py"


def test_worker_tasks_push_and_pull_with_progress_in_the_task_log(install_dag, testbed):
    site1 = testbed.facility("site1")
    work = Path(tempfile.mkdtemp(prefix="xffl-transfer-dag.", dir="/tmp"))
    remote = f"dag-{uuid.uuid4().hex[:8]}"
    try:
        model = work / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "gpt2"}')
        (model / "model.safetensors").write_bytes(os.urandom(24 << 20))
        airflow = install_dag(DAG_FILE, "xffl_transfer_roundtrip")
        conf = {
            "workdir": site1.workdir,
            "model_dir": str(model),
            "remote_dir": remote,
            "back_dir": str(work / "back"),
        }
        run_id = airflow.trigger("xffl_transfer_roundtrip", conf=conf)
        assert airflow.wait_for_run("xffl_transfer_roundtrip", run_id, timeout=300) == "success"

        for task_id, verb in (("push_model", "push"), ("pull_model", "pull")):
            log = airflow.task_log("xffl_transfer_roundtrip", run_id, task_id)
            progress = re.findall(
                rf"{verb} .*: [\d.]+/24\.0 MiB \((\d+)%\), [\d.]+ MB/s, (ETA \d+s|done)", log
            )
            assert len(progress) >= 3 and progress[-1] == ("100", "done"), log[-3000:]
            assert "model.safetensors verified (sha256" in log, log[-3000:]
        pulled = airflow.api(
            "GET",
            f"dags/xffl_transfer_roundtrip/dagRuns/{run_id}/taskInstances/pull_model/xcomEntries/return_value",
        )["value"]
        digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
        assert f"'model.safetensors': '{digest}'" in str(pulled) or digest in str(pulled)
        assert (work / "back" / "model.safetensors").read_bytes() == (
            model / "model.safetensors"
        ).read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path(site1.workdir) / remote, ignore_errors=True)
