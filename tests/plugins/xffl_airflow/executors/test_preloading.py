"""The preloading LocalExecutor: its pure parts here; that task processes really start with the
modules loaded is checked against the running test Airflow in
tests/xffl_testbed/test_airflow_instance.py.

Starts: nothing (the module-import checks run in a fresh ``python`` subprocess each, which
ends before the test does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from xffl_airflow.executors.preloading import DEFAULT_PRELOAD, parse_module_list, preload

REPO = Path(__file__).resolve().parents[4]


def test_a_module_list_is_split_on_commas_and_stripped():
    assert parse_module_list(" a.b , c,,d_e.f ") == ["a.b", "c", "d_e.f"]
    assert parse_module_list("") == []


@pytest.mark.parametrize("bad", ["a..b", "a.b;rm", "1abc", "a b", "a.-b"])
def test_a_malformed_module_name_is_refused_naming_the_setting(bad):
    with pytest.raises(ValueError, match=r"\[xffl\] preload_modules: .* is not a module name"):
        parse_module_list(f"json,{bad}")


def test_preload_imports_what_it_can_and_says_why_the_rest_failed():
    loaded, failed = preload(["json", "xffl_no_such_module_here", "colorsys"])
    assert loaded == ["json", "colorsys"]
    assert list(failed) == ["xffl_no_such_module_here"]
    assert failed["xffl_no_such_module_here"].startswith("ModuleNotFoundError")


def test_the_default_modules_import_and_bring_torch_along():
    """In a fresh interpreter: every default module imports (no Airflow config, connection or
    database needed at import time), and torch comes with them: that is the cost saved."""
    code = (
        "import json, sys\n"
        "from xffl_airflow.executors.preloading import DEFAULT_PRELOAD, preload\n"
        "print(json.dumps([preload(DEFAULT_PRELOAD), 'torch' in sys.modules]))\n"
    )
    env = {"PYTHONPATH": f"{REPO / 'plugins'}:{REPO}", "PATH": "/usr/bin:/bin",
           "AIRFLOW_HOME": "/nonexistent-xffl-home", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (loaded, failed), torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}
    assert loaded == list(DEFAULT_PRELOAD)
    assert torch_loaded
