"""``make demo KEEP=1`` stops on SIGINT and SIGTERM however it was started, even as a
background job that inherited SIGINT ignored: Airflow and the facilities are torn down.

Unit level: the demo's ``main()`` runs in a subprocess with SIGINT ignored (as a shell's
background job has it), against fakes of the test bed, the tiny model and Airflow; the fake
Airflow is a real child process (it stands for the components), so the test sees that the
teardown ends it. Nothing else is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_DEMO = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace
import xffl_testbed.demo as demo

out = Path(sys.argv[1])
marks = out / "marks"

def mark(text):
    with open(marks, "a") as f:
        f.write(text + "\n")

class FakeTestbed:
    facilities = [SimpleNamespace(name="italy", workdir="/w/i"), SimpleNamespace(name="czechia", workdir="/w/c")]
    @classmethod
    def up(cls, *args, **kwargs):
        mark("facilities up")
        return cls()
    def airflow_env(self):
        return {}
    def down(self, purge=False):
        mark("facilities down")

class FakeAirflow:
    base_url, username, password = "http://127.0.0.1:1", "admin", "secret"
    def __init__(self, home, **kwargs):
        self.home = Path(home)
    def migrate(self):
        pass
    def start(self):
        # a child with the signal dispositions the demo hands down
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (out / "child.pid").write_text(str(self.child.pid))
        mark("airflow up")
    def wait_for_dag(self, dag_id, timeout=0):
        pass
    def trigger(self, dag_id, run_id=None, conf=None, note=None):
        return run_id
    def stop(self):
        self.child.terminate()
        self.child.wait(10)
        mark("airflow down")

def fake_wait(airflow, dag_id, campaign, campaign_dir, **kwargs):
    campaign_dir.mkdir(parents=True, exist_ok=True)
    (campaign_dir / "report.txt").write_text("table\n")
    if os.environ.get("FAKE_HANG"):
        mark("campaign running")
        time.sleep(600)
    return [{"dag_run_id": "xffl__demo__round-0000", "state": "success"}]

demo.Testbed = FakeTestbed
demo.AirflowInstance = FakeAirflow
demo.facility_python = lambda: sys.executable
demo.make_tiny = lambda path: path
demo.place_private_data = lambda facility, corpus, name: f"/data/{name}"
demo.wait_for_campaign = fake_wait
demo.campaign_runs = lambda *a: [1]
demo.show_release = lambda airflow, storage: 0
demo.subprocess = SimpleNamespace(run=lambda *a, **k: SimpleNamespace(returncode=0, stdout="OK fake", stderr=""))
sys.exit(demo.run())
"""


def _ignore_sigint() -> None:  # what a background job started by a shell without job control gets
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the demo ended early ({process.returncode}): {process.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"no {text!r} in {path} after {timeout} s")


@pytest.mark.parametrize(
    ("sig", "hang", "expected"),
    [
        (signal.SIGINT, False, 0),  # KEEP=1: Ctrl-C after the campaign is the normal way out
        (signal.SIGTERM, False, 0),
        (signal.SIGTERM, True, 128 + signal.SIGTERM),  # mid-campaign: torn down, then 143
        (signal.SIGINT, True, 128 + signal.SIGINT),
    ],
)
def test_the_demo_stops_on_a_signal_though_started_with_sigint_ignored(tmp_path, sig, hang, expected):
    env = {**os.environ, "XFFL_DEMO_DIR": str(tmp_path / "work"), "XFFL_DEMO_KEEP": "1", "PYTHONPATH": str(REPO)}
    if hang:
        env["FAKE_HANG"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-c", FAKE_DEMO, str(tmp_path)], env=env, cwd=REPO, preexec_fn=_ignore_sigint,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        marks = tmp_path / "marks"
        _wait_for(marks, "campaign running" if hang else "airflow up", process)
        if not hang:
            time.sleep(1.0)  # into the keep loop
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(child)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == expected, output
    assert marks.read_text().splitlines()[-2:] == ["airflow down", "facilities down"], output
    assert not _alive(child)
    assert "tearing down" in output and signal.Signals(sig).name in output
