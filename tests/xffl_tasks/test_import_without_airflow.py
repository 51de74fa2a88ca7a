"""xffl_tasks installs and imports where there is no Airflow (the facility environment)."""

from __future__ import annotations

import subprocess

from tests.conftest import facility_python


def test_facility_environment_imports_xffl_tasks_and_has_no_airflow():
    code = (
        "import importlib.util, xffl_tasks; "
        "assert importlib.util.find_spec('airflow') is None, 'airflow is installed'; "
        "print(xffl_tasks.__file__)"
    )
    result = subprocess.run(
        [facility_python(), "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert "site-packages/xffl_tasks/__init__.py" in result.stdout


def test_xffl_tasks_sources_never_import_airflow():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "xffl_tasks"
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import airflow", "from airflow")):
                offenders.append(f"{path}:{number}: {stripped}")
    assert offenders == []
