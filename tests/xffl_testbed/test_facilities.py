"""Where the test bed, the demo and the benchmarks look for the facility-side Python."""

from __future__ import annotations

import re
import subprocess

from xffl_testbed import facilities
from xffl_testbed.facilities import facility_python


def test_the_environment_variable_make_exports_wins(monkeypatch):
    monkeypatch.setenv("XFFL_FACILITY_PYTHON", "/opt/facility/bin/python")
    assert facility_python() == "/opt/facility/bin/python"


def test_without_it_the_makefile_fallback_path_is_found(monkeypatch, tmp_path):
    """A checkout the facility users cannot read keeps the environment in /var/tmp, under the
    same hash of the checkout's path as the Makefile computes."""
    monkeypatch.delenv("XFFL_FACILITY_PYTHON", raising=False)
    monkeypatch.setattr(facilities, "REPO", tmp_path)
    makefile_digest = subprocess.run(
        ["sh", "-c", 'echo "$0" | md5sum | cut -c1-10', str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{10}", makefile_digest)
    assert facility_python() == f"/var/tmp/xffl-airflow-facility-{makefile_digest}/bin/python"
    (tmp_path / ".venv-facility" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-facility" / "bin" / "python").touch()
    assert facility_python() == str(tmp_path / ".venv-facility" / "bin" / "python")
