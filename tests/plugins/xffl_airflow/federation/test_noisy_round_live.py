"""A whole federation round (push, train, pull, aggregate) with a facility whose login shell
prints on every start, as real login nodes do: a banner on stdout, a line without newline, a
terminal-title escape sequence, and a notice on stderr.

Starts: the session's ``testbed`` (two facilities, SFTP through ``internal-sftp``) and
``airflow_instance`` (api-server, scheduler, dag-processor, triggerer on SQLite), stopped at the
end of the session by PID. site1's ``~/.bashrc`` is written for this test and put back after it
(the session's facilities are shared with other tests).
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from tests.plugins.xffl_airflow.federation.campaign_support import run_campaign
from xffl_testbed.campaign import wait_for_campaign

pytestmark = pytest.mark.slow

NOISY_BASHRC = (
    "echo '*** Welcome to login01 ***'\n"
    "echo 'Quota: 91% of /home used'\n"
    "printf 'Last login: Mon from 10.0.0.1'\n"
    "printf '\\033]0;%s@login01\\007' \"$USER\"\n"
    "echo 'module: slurm loaded' >&2\n"
)


@pytest.fixture
def noisy_site1(testbed):
    site1 = testbed.facility("site1")
    bashrc = Path(site1.home) / ".bashrc"
    saved = bashrc.read_bytes() if bashrc.exists() else None
    bashrc.write_text(NOISY_BASHRC)
    user = pwd.getpwnam(site1.user)
    os.chown(bashrc, user.pw_uid, user.pw_gid)
    try:
        yield site1
    finally:
        if saved is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_bytes(saved)


def test_a_round_with_a_noisy_login_shell_succeeds(
    airflow_instance, testbed, corpora, tiny, storage, noisy_site1
):
    assert noisy_site1.ssh("true").stdout.startswith("*** Welcome to login01 ***\n")
    dag_id = run_campaign(
        airflow_instance, testbed, corpora, tiny, storage, campaign="noisy",
        convergence={"max_rounds": 1},
    )  # fmt: skip
    runs = wait_for_campaign(airflow_instance, dag_id, "noisy", storage / "noisy", timeout=900)
    assert [r["state"] for r in runs] == ["success"], runs
    manifest = json.loads((storage / "noisy" / "round-0000" / "manifest.json").read_text())
    assert manifest["participants"] == ["site1", "site2"]
    site = manifest["facilities"]["site1"]
    assert site["job"]["state"] == "COMPLETED" and site["metrics"]["num_samples"] > 0
    assert manifest["outputs"] and all(len(h) == 64 for h in manifest["outputs"].values())
