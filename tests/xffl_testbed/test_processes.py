"""Process bookkeeping of the test bed (``xffl_testbed.processes``).

Starts: one short ``sleep`` child per test, waited for (reaped) before the test ends.
"""

from __future__ import annotations

import os
import subprocess

from xffl_testbed.processes import alive, owner, with_descendants


def test_owner_is_the_user_of_a_running_process_and_none_once_it_has_gone():
    assert owner(os.getpid()) == os.geteuid()
    child = subprocess.Popen(["sleep", "30"])
    assert owner(child.pid) == os.geteuid()
    child.kill()
    child.wait()
    assert owner(child.pid) is None


def test_with_descendants_finds_children_and_skips_gone_pids():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert {os.getpid(), child.pid} <= with_descendants([os.getpid()])
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)
    assert with_descendants([child.pid]) == set()
