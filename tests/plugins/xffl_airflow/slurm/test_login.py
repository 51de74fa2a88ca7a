"""The login environment around every Slurm command: literal shell text, and validation (once,
when the ``FacilityLogin`` is made; again when a trigger rebuilds it from its JSON form)."""

from __future__ import annotations

import pytest
from xffl_airflow.slurm.commands import build_login_command, build_squeue_command
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.login import FacilityLogin

login_environment = FacilityLogin.of


def test_the_preamble_runs_first_off_stdout_and_stdin_then_slurm_bin_leads_the_path():
    login = login_environment(["module load slurm", "", "export SLURM_TIME_FORMAT=standard"],
                              "/opt/slurm 23/bin".replace(" ", "_"))  # fmt: skip
    assert build_login_command("sh -s", login) == (
        "{\nmodule load slurm\nexport SLURM_TIME_FORMAT=standard\n} </dev/null >&2\n"
        'PATH=/opt/slurm_23/bin:"$PATH"; export PATH\n'
        "sh -s"
    )
    assert build_login_command("scancel 42", login_environment(slurm_bin="/usr/local/bin")) == (
        'PATH=/usr/local/bin:"$PATH"; export PATH\nscancel 42'
    )


def test_without_a_login_environment_the_command_is_unchanged():
    command = build_squeue_command(["42"])
    assert build_login_command(command, None) == command
    assert build_login_command(command, login_environment()) == command
    assert not FacilityLogin() and FacilityLogin().key("site1") == "site1"


def test_two_environments_on_one_connection_have_two_keys():
    a, b = login_environment(["module load slurm"]), login_environment(["module load slurm/23"])
    assert a.key("site1") != b.key("site1") != "site1"
    assert a.key("site1") == login_environment(["module load slurm"]).key("site1")
    assert a.key("site1").startswith("site1#login-")


@pytest.mark.parametrize(
    ("preamble", "slurm_bin", "words"),
    [
        (["a\nb"], None, "login_preamble[0]"),
        (["ok", "a\rb"], None, "login_preamble[1]"),
        ("module load slurm", None, "list of shell lines"),
        ([], "bin", "absolute"),
        ([], "/opt/../bin", "without '..'"),
        ([], "/opt/slurm bin", "safe remote path"),
        ([], "-/x", "safe remote path|must not start"),
    ],
)
def test_bad_values_are_refused_naming_the_field(preamble, slurm_bin, words):
    with pytest.raises(SlurmInputError) as caught:
        login_environment(preamble, slurm_bin)
    assert any(word in str(caught.value) for word in words.split("|"))


def test_the_json_form_round_trips_and_is_validated_again():
    login = FacilityLogin.of(["module load slurm", ""], "/opt/slurm/bin")
    assert login.to_dict() == {"preamble": ["module load slurm"], "slurm_bin": "/opt/slurm/bin"}
    assert FacilityLogin.from_dict(login.to_dict()) == login
    assert FacilityLogin.from_dict(None) == FacilityLogin()
    with pytest.raises(SlurmInputError, match="login_preamble\\[0\\]"):
        FacilityLogin.from_dict({"preamble": ["a\nrm -rf ~"], "slurm_bin": None})
    with pytest.raises(SlurmInputError, match="must be a mapping of preamble and slurm_bin"):
        FacilityLogin.from_dict({"preamble": [], "shell": "/bin/sh"})
