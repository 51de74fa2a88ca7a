"""No error shows a run of 8 or more characters of an ``${XFFL_*}`` value (docs/security.md, R3):
``scrub`` on literal texts (a PEM key echoed in a preamble line, a value cut to 40 characters,
newlines escaped by repr and JSON, overlapping values), ``xffl_secrets``, and the error paths
that use them (the config's errors, ``SlurmInputError``, the Slurm operator's errors).

Unit level: nothing is started.
"""

from __future__ import annotations

import json

import pytest
import yaml
from xffl_airflow.federation.config import ConfigError, load_config
from xffl_airflow.operators.slurm_results import (
    SlurmConfigError,
    SlurmJobError,
    SlurmJobFailed,
    check_event,
)
from xffl_airflow.secrets_scrub import MIN_RUN, scrub, shown_forms, xffl_secrets
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.validation import check_shell_line

PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDq1Xw0mN8u3kP2Zz9Rj5bYqK4HcVtW7fLsT0aQe1nOxAAAAJgS3cDxEt3A\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
TOKEN = "tok_9f8e7d6c5b4a39281706f5e4d3c2b1a0ZZ"


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """Every run of ``MIN_RUN`` characters of a shown form of a value that ``text`` holds."""
    found = []
    for value in secrets.values():
        for form in shown_forms(value):
            for start in range(len(form) - MIN_RUN + 1):
                if form[start : start + MIN_RUN] in text:
                    found.append(form[start : start + MIN_RUN])
    return found


def test_a_pem_key_echoed_in_a_preamble_line_is_masked_as_repr_shows_it():
    line = f"export KEY='{PEM}'"
    error = f"login_preamble[0]: must be a single line without NUL characters, got {line[:200]!r}"
    assert "\\n" in error and PEM not in error  # the whole value is not there to replace
    shown = scrub(error, {"XFFL_KEY": PEM})
    assert shown == (
        "login_preamble[0]: must be a single line without NUL characters, got "
        '"export KEY=\'${XFFL_KEY}"'
    )
    assert leaks(shown, {"XFFL_KEY": PEM}) == []


def test_a_value_cut_to_40_characters_is_masked():
    error = f"storage: {TOKEN[:40]!r} is not an absolute path (and 12 more characters)"
    assert scrub(error, {"XFFL_TOKEN": TOKEN}) == (
        "storage: '${XFFL_TOKEN}' is not an absolute path (and 12 more characters)"
    )
    # its middle, and its end cut to 8 characters, too; 7 characters are not a run
    assert scrub(f"x{TOKEN[10:18]}y {TOKEN[-7:]}", {"XFFL_TOKEN": TOKEN}) == (
        f"x${{XFFL_TOKEN}}y {TOKEN[-7:]}"
    )


@pytest.mark.parametrize(
    "shown",
    [
        lambda v: repr(v),
        lambda v: json.dumps(v),
        lambda v: json.dumps({"extra": {"private_key": v}}),
        lambda v: repr(repr(v)[:60]),  # a repr of a message that held a cut repr
        lambda v: repr(v + "'\"")[:90],  # both quotes: repr escapes the single one
    ],
    ids=["repr", "json", "json-nested", "repr-twice", "both-quotes"],
)
def test_escaped_newlines_inside_the_value_are_masked(shown):
    secrets = {"XFFL_KEY": PEM}
    text = f"refused: {shown(PEM)}"
    masked = scrub(text, secrets)
    assert "${XFFL_KEY}" in masked and leaks(masked, secrets) == []
    assert masked.startswith("refused: ")


def test_overlapping_and_adjacent_values_are_all_masked():
    secrets = {"XFFL_A": "alpha-0123456789", "XFFL_B": "0123456789-omega", "XFFL_C": "xyzxyzxyzxyz"}
    text = "url alpha-0123456789-omega then xyzxyzxyzxyzalpha-01 end"
    masked = scrub(text, secrets)
    assert masked == "url ${XFFL_A}${XFFL_B} then ${XFFL_C}${XFFL_A} end"
    assert leaks(masked, secrets) == []
    # a value inside another: the longer one's name covers it where both match
    inner = {"XFFL_URL": f"https://u:{TOKEN}@host/x", "XFFL_TOKEN": TOKEN}
    masked = scrub(f"cannot reach https://u:{TOKEN}@host/x (token {TOKEN[:12]})", inner)
    assert leaks(masked, inner) == [] and "(token ${XFFL_" in masked


def test_text_without_a_run_and_short_values_are_left_alone():
    text = "facilities[0].workdir: must be an absolute path, got 'rel/dir'"
    assert scrub(text, {"XFFL_A": TOKEN, "XFFL_SHORT": "rel/dir"}) == text
    assert scrub(text, {}) == text and scrub("", {"XFFL_A": TOKEN}) == ""
    with pytest.raises(ValueError, match="min_run"):
        scrub(text, {"XFFL_A": TOKEN}, min_run=0)


def test_a_path_value_masks_its_runs_across_a_separator_not_its_words():
    secrets = {"XFFL_FACILITY_PYTHON": "/opt/venv-facility/bin/python"}
    text = "num_samples exceeds the facility's declared bound; ran /opt/venv-facility/bin/python -m x"
    assert scrub(text, secrets) == (
        "num_samples exceeds the facility's declared bound; ran ${XFFL_FACILITY_PYTHON} -m x"
    )
    # a part cut short: the runs that hold a separator are masked, the words before stay
    assert scrub("got venv-facility/b", secrets) == "got venv-f${XFFL_FACILITY_PYTHON}"
    # not a plain path (a space, a URL): every run, as for any other value
    url = {"XFFL_URL": "https://user:sesame-open@host/x"}
    assert scrub("password sesame-open", url) == "password ${XFFL_URL}"


def test_xffl_secrets_gives_the_xffl_values_worth_masking():
    environ = {"XFFL_TOKEN": TOKEN, "XFFL_FLAG": "1", "XFFL_EMPTY": "", "AIRFLOW_CONN_X": PEM,
               "HOME": "/home/someone", "XFFL_KEY": PEM}  # fmt: skip
    assert xffl_secrets(environ) == {"XFFL_TOKEN": TOKEN, "XFFL_KEY": PEM}
    assert xffl_secrets(environ, names={"XFFL_KEY", "XFFL_FLAG"}) == {"XFFL_KEY": PEM}
    assert xffl_secrets(environ, min_length=1)["XFFL_FLAG"] == "1"
    # xffl's own settings are not values a config refers to: "scheduler" stays readable
    own = {"XFFL_AIRFLOW_COMPONENT": "scheduler", "XFFL_FEDERATION_CONFIG": "/etc/xffl/fed.yaml",
           "XFFL_EXTRA_SYSTEM_PACKAGES": "postgresql redis-server", "XFFL_DEMO_DIR": "/srv/demo/x"}  # fmt: skip
    assert xffl_secrets({**environ, **own}) == {"XFFL_TOKEN": TOKEN, "XFFL_KEY": PEM}
    assert xffl_secrets(own, names={"XFFL_FEDERATION_CONFIG"}) == {
        "XFFL_FEDERATION_CONFIG": "/etc/xffl/fed.yaml"
    }  # named explicitly: masked


# -- the error paths ---------------------------------------------------------------------------

BASE = {
    "campaign": "demo",
    "storage": "/srv/xffl",
    "base_model": "/srv/models/tiny",
    "facilities": [{"name": "italy", "workdir": "/home/a/xffl", "data": "/home/a/data"}],
}


def test_the_config_error_of_a_pem_key_in_a_preamble_line_shows_no_part_of_it(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XFFL_TEST_KEY", PEM)
    facility = {**BASE["facilities"][0], "preamble": ["export KEY='${XFFL_TEST_KEY}'"]}
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({**BASE, "facilities": [facility]}))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert "facilities[0].preamble" in message and "${XFFL_TEST_KEY}" in message
    assert leaks(message, {"XFFL_TEST_KEY": PEM}) == []


def test_the_config_error_of_a_cut_value_shows_no_part_of_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XFFL_TEST_BIN", "/opt/" + TOKEN * 3 + " bad")  # echoed cut to 80
    path = tmp_path / "federation.yaml"
    facility = {**BASE["facilities"][0], "slurm_bin": "${XFFL_TEST_BIN}"}
    path.write_text(yaml.safe_dump({**BASE, "facilities": [facility]}))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert "facilities[0].slurm_bin" in message and "${XFFL_TEST_BIN}" in message
    assert leaks(message, {"XFFL_TEST_BIN": "/opt/" + TOKEN * 3 + " bad"}) == []


def test_slurm_input_errors_mask_xffl_values(monkeypatch):
    monkeypatch.setenv("XFFL_TEST_KEY", PEM)
    with pytest.raises(SlurmInputError) as refused:
        check_shell_line(f"export KEY='{PEM}'", "login_preamble[0]")
    assert refused.value.field == "login_preamble[0]"
    for text in (str(refused.value), refused.value.detail):
        assert "${XFFL_TEST_KEY}" in text and leaks(text, {"XFFL_TEST_KEY": PEM}) == []


def test_slurm_operator_errors_mask_xffl_values(monkeypatch):
    monkeypatch.setenv("XFFL_TEST_TOKEN", TOKEN)
    event = {"status": "failed", "job_id": "7", "message": "m", "conn_id": "facility_x",
             "state": "FAILED", "log_tail": [f"curl -H 'Authorization: {TOKEN[:30]}'"]}  # fmt: skip
    with pytest.raises(SlurmJobFailed) as failed:
        check_event(event, task_id="train")
    assert "Authorization: ${XFFL_TEST_TOKEN}'" in str(failed.value)
    assert leaks(str(failed.value), {"XFFL_TEST_TOKEN": TOKEN}) == []
    with pytest.raises(SlurmJobError) as broken:
        check_event({"status": "odd", "token": TOKEN}, task_id="train")  # echoes the event
    assert leaks(str(broken.value), {"XFFL_TEST_TOKEN": TOKEN}) == []
    assert "lacks job_id, message" in str(broken.value)
    assert leaks(str(SlurmConfigError(f"got {TOKEN!r}")), {"XFFL_TEST_TOKEN": TOKEN}) == []
