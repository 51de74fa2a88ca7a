"""The trigger carries the facility's login environment (JSON-safe) to a poller of its own:
two login environments on one connection id never share a poller. Unit level."""

from __future__ import annotations

import asyncio
import json

from xffl_airflow.hooks.slurm_poller import poller_for
from xffl_airflow.slurm.commands import login_environment
from xffl_airflow.triggers.slurm import SlurmJobTrigger


def test_the_login_environment_survives_serialize():
    trigger = SlurmJobTrigger(ssh_conn_id="site1", job_id="42",
                              login_preamble=["module load slurm"], slurm_bin="/opt/slurm/bin")  # fmt: skip
    _, kwargs = trigger.serialize()
    again = SlurmJobTrigger(**json.loads(json.dumps(kwargs)))
    assert again.serialize()[1] == kwargs
    assert kwargs["login_preamble"] == ["module load slurm"]
    assert kwargs["slurm_bin"] == "/opt/slurm/bin"
    assert SlurmJobTrigger(ssh_conn_id="s", job_id="1").serialize()[1]["login_preamble"] == []


def test_pollers_are_keyed_by_connection_and_login_environment():
    async def pollers():
        plain = poller_for("site1")
        module = poller_for("site1", login=login_environment(["module load slurm"]))
        same = poller_for("site1", login=login_environment(["module load slurm"]))
        other = poller_for("site1", login=login_environment(slurm_bin="/opt/slurm/bin"))
        return plain, module, same, other

    plain, module, same, other = asyncio.run(pollers())
    assert module is same and len({id(plain), id(module), id(other)}) == 3
    assert plain.key == "site1" and module.login.preamble == ("module load slurm",)
    assert other.login.slurm_bin == "/opt/slurm/bin"
