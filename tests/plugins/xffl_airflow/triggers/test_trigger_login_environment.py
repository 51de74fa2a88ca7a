"""The trigger carries the facility's login environment (JSON-safe) to a poller of its own:
two login environments on one connection id never share a poller. Unit level."""

from __future__ import annotations

import asyncio
import json

from xffl_airflow.hooks.slurm_poller import poller_for
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.triggers.slurm import SlurmJobTrigger


def test_the_login_environment_survives_serialize():
    login = FacilityLogin.of(["module load slurm"], "/opt/slurm/bin")
    trigger = SlurmJobTrigger(ssh_conn_id="site1", job_id="42", login=login.to_dict())
    _, kwargs = trigger.serialize()
    again = SlurmJobTrigger(**json.loads(json.dumps(kwargs)))
    assert again.serialize()[1] == kwargs
    assert kwargs["login"] == {"preamble": ["module load slurm"], "slurm_bin": "/opt/slurm/bin"}
    assert SlurmJobTrigger(ssh_conn_id="s", job_id="1").serialize()[1]["login"] == {"preamble": [], "slurm_bin": None}


def test_a_trigger_row_of_an_earlier_version_keeps_its_login_environment():
    old = SlurmJobTrigger(ssh_conn_id="site1", job_id="42", login_preamble=["module load slurm"], slurm_bin="/opt/slurm/bin")
    assert old.serialize()[1]["login"] == {"preamble": ["module load slurm"], "slurm_bin": "/opt/slurm/bin"}


def test_pollers_are_keyed_by_connection_and_login_environment():
    async def pollers():
        plain = poller_for("site1")
        module = poller_for("site1", login=FacilityLogin.of(["module load slurm"]))
        same = poller_for("site1", login=FacilityLogin.of(["module load slurm"]))
        other = poller_for("site1", login=FacilityLogin.of(slurm_bin="/opt/slurm/bin"))
        return plain, module, same, other

    plain, module, same, other = asyncio.run(pollers())
    assert module is same and len({id(plain), id(module), id(other)}) == 3
    assert plain.key == "site1" and module.login.preamble == ("module load slurm",)
    assert other.login.slurm_bin == "/opt/slurm/bin"
