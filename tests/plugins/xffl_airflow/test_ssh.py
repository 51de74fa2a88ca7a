"""Opening facility connections: host keys pinned and checked, clear errors."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from xffl_airflow.ssh import (
    FacilityConnectionError,
    connect,
    get_target,
    known_hosts_line,
    target_from_connection,
)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGweSu7R6TPYPF70Lko35SziDPAo/sJvCT/bxDIOc9Ig"


def conn(**extra):
    return SimpleNamespace(
        conn_id="facility_x",
        host="hpc.example.org",
        port=2222,
        login="alice",
        password=None,
        extra_dejson=extra,
    )


def test_known_hosts_line_brackets_non_default_ports():
    assert known_hosts_line("h", 22, HOST_KEY + " comment") == f"h {HOST_KEY}\n"
    assert known_hosts_line("h", 2222, HOST_KEY) == f"[h]:2222 {HOST_KEY}\n"


def test_target_pins_the_host_key_from_the_extra():
    target = target_from_connection(conn(host_key=HOST_KEY, key_file="/k", conn_timeout=5))
    assert target.known_hosts == f"[hpc.example.org]:2222 {HOST_KEY}\n"
    assert (target.key_file, target.connect_timeout, target.address) == (
        "/k",
        5.0,
        "alice@hpc.example.org:2222",
    )


@pytest.mark.parametrize("flag", ["no_host_key_check", "ignore_hostkey_verification"])
def test_skipping_the_host_key_check_is_refused(flag):
    with pytest.raises(FacilityConnectionError, match="facility_x.*skip host-key checking"):
        target_from_connection(conn(**{flag: "true"}))


def test_a_host_key_without_type_is_refused():
    with pytest.raises(FacilityConnectionError, match="host_key must read 'TYPE BASE64'"):
        target_from_connection(conn(host_key="AAAAC3Nz"))


def test_no_host_key_and_no_known_hosts_file_is_refused(tmp_path):
    with pytest.raises(FacilityConnectionError, match="cannot be checked"):
        target_from_connection(conn(known_hosts=str(tmp_path / "missing")))


def test_missing_login_is_named():
    bad = conn(host_key=HOST_KEY)
    bad.login = None
    with pytest.raises(FacilityConnectionError, match="no login"):
        target_from_connection(bad)


def test_a_missing_airflow_connection_is_named(airflow_db):
    with pytest.raises(FacilityConnectionError, match="'facility_nowhere': not found"):
        get_target("facility_nowhere")


@pytest.mark.slurm
def test_connect_checks_the_pinned_host_key(testbed, monkeypatch):
    site1, site2 = testbed.facilities
    monkeypatch.setenv(f"AIRFLOW_CONN_{site1.conn_id.upper()}", json.dumps(site1.connection))

    async def whoami(target):
        async with await connect(target) as ssh:
            return (await ssh.run("id -un", check=True)).stdout.strip()

    assert asyncio.run(whoami(get_target(site1.conn_id))) == site1.user

    wrong = {**site1.connection, "extra": {**site1.connection["extra"], "host_key": site2.host_key}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{site1.conn_id.upper()}", json.dumps(wrong))
    with pytest.raises(FacilityConnectionError, match="does not match the pinned key") as caught:
        asyncio.run(whoami(get_target(site1.conn_id)))
    assert caught.value.retryable is False


@pytest.mark.slurm
def test_unreachable_host_is_retryable(testbed):
    site1 = testbed.facilities[0]
    target = target_from_connection(
        SimpleNamespace(
            conn_id="c",
            host="127.0.0.1",
            port=1,
            login="u",
            password=None,
            extra_dejson={"host_key": site1.host_key, "conn_timeout": 3},
        )
    )
    with pytest.raises(FacilityConnectionError, match="cannot reach") as caught:
        asyncio.run(connect(target))
    assert caught.value.retryable is True
