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


# -- certificates, jump hosts, timeouts (pure: no sshd) ----------------------------------------

import time  # noqa: E402

import asyncssh  # noqa: E402
from xffl_airflow.ssh import (  # noqa: E402
    MAX_JUMP_HOSTS,
    SSHTarget,
    check_hop,
    connect_options,
    parse_jump_hosts,
)


def make_cert(tmp_path, *, after: float, before: float, key=None, name="cert.pub"):
    """A user key (written to tmp_path/key) and its certificate file, signed by a fresh CA."""
    ca = asyncssh.generate_private_key("ssh-ed25519")
    key = key or asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(tmp_path / "key"))
    cert = ca.generate_user_certificate(key, "alice", principals=["alice"],
                                        valid_after=int(after), valid_before=int(before))  # fmt: skip
    path = tmp_path / name
    cert.write_certificate(str(path))
    return key, path


def cert_target(tmp_path, path, **extra):
    return target_from_connection(
        conn(host_key=HOST_KEY, key_file=str(tmp_path / "key"), certificate_file=str(path), **extra)
    )


def test_certificate_extras_reach_the_target_and_stay_out_of_its_repr(tmp_path):
    key, path = make_cert(tmp_path, after=time.time() - 60, before=time.time() + 3600)
    text = path.read_text()
    inline = target_from_connection(
        conn(host_key=HOST_KEY, private_key=key.export_private_key().decode(), certificate=text)
    )
    assert inline.certificate == text and "AAAA" not in repr(inline)
    assert "PRIVATE" not in repr(inline)
    by_file = cert_target(tmp_path, path)
    assert by_file.certificate_file == str(path)
    for target in (inline, by_file):
        [(loaded_key, cert)] = connect_options(target)["client_keys"]
        assert loaded_key.public_data == key.public_data == cert.key.public_data


def test_a_certificate_needs_a_key_and_only_one_source(tmp_path):
    with pytest.raises(FacilityConnectionError, match="no private_key or key_file"):
        target_from_connection(conn(host_key=HOST_KEY, certificate_file="/c"))
    with pytest.raises(FacilityConnectionError, match="both certificate and certificate_file"):
        target_from_connection(conn(host_key=HOST_KEY, key_file="/k", certificate="x", certificate_file="/c"))


def test_an_expired_certificate_is_retryable_and_names_its_expiry(tmp_path):
    ended = int(time.time()) - 30
    _, path = make_cert(tmp_path, after=ended - 3600, before=ended)
    with pytest.raises(FacilityConnectionError) as caught:
        connect_options(cert_target(tmp_path, path))
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ended))
    assert f"expired at {expiry}" in str(caught.value)
    assert "facility_x" in str(caught.value) and str(path) in str(caught.value)
    assert caught.value.retryable is True


def test_a_certificate_not_yet_valid_is_retryable(tmp_path):
    starts = int(time.time()) + 600
    _, path = make_cert(tmp_path, after=starts, before=starts + 3600)
    with pytest.raises(FacilityConnectionError, match="not valid before") as caught:
        connect_options(cert_target(tmp_path, path))
    assert caught.value.retryable is True


def test_the_certificate_file_is_read_again_on_every_connect(tmp_path):
    key, path = make_cert(tmp_path, after=time.time() - 120, before=time.time() - 60)
    target = cert_target(tmp_path, path)
    with pytest.raises(FacilityConnectionError, match="expired"):
        connect_options(target)
    make_cert(tmp_path, after=time.time() - 60, before=time.time() + 3600, key=key)  # renewed
    assert connect_options(target)["client_keys"][0][1].key.public_data == key.public_data


def test_a_missing_certificate_file_is_retryable_and_a_wrong_one_is_not(tmp_path):
    _, path = make_cert(tmp_path, after=time.time() - 60, before=time.time() + 3600)
    with pytest.raises(FacilityConnectionError, match="cannot read certificate_file") as caught:
        connect_options(cert_target(tmp_path, tmp_path / "renewing.pub"))
    assert caught.value.retryable is True
    (tmp_path / "bad.pub").write_text("not a certificate\n")
    with pytest.raises(FacilityConnectionError, match="not an OpenSSH certificate") as caught:
        connect_options(cert_target(tmp_path, tmp_path / "bad.pub"))
    assert caught.value.retryable is False
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(tmp_path / "key"))  # another key
    with pytest.raises(FacilityConnectionError, match="certifies another key") as caught:
        connect_options(cert_target(tmp_path, path))
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("value", "hops"),
    [(None, ()), ("bastion", ("bastion",)), ("outer, inner", ("outer", "inner")), (["a", "b"], ("a", "b"))],
)
def test_jump_host_extra_names_the_route(value, hops):
    assert parse_jump_hosts("facility_x", value) == hops
    assert target_from_connection(conn(host_key=HOST_KEY, jump_host=value)).jump_conn_ids == hops


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("facility_x", "loops back"),
        (["a", "b", "a"], "twice"),
        ([f"h{i}" for i in range(MAX_JUMP_HOSTS + 1)], f"at most {MAX_JUMP_HOSTS}"),
        ({"host": "b"}, "connection id or a list"),
        ("a,,b", "empty connection id"),
    ],
)
def test_bad_routes_are_refused(value, message):
    with pytest.raises(FacilityConnectionError, match=message):
        parse_jump_hosts("facility_x", value)


def hop(conn_id="bastion", **extra):
    return target_from_connection(
        SimpleNamespace(conn_id=conn_id, host="gw.example.org", port=22, login="bob", password=None,
                        extra_dejson=extra)  # fmt: skip
    )


def test_a_hop_needs_its_host_key_pinned_for_its_own_host(tmp_path):
    assert check_hop("facility_x", hop(host_key=HOST_KEY)).conn_id == "bastion"
    other = tmp_path / "known_hosts"
    other.write_text(f"somewhere.else {HOST_KEY}\n")
    with pytest.raises(FacilityConnectionError, match="'bastion' has no pinned host key for gw.example.org:22"):
        check_hop("facility_x", hop(known_hosts=str(other)))


def test_a_hop_with_hops_of_its_own_is_refused():
    with pytest.raises(FacilityConnectionError, match="list the whole route"):
        check_hop("facility_x", hop(host_key=HOST_KEY, jump_host="another"))


def test_get_target_looks_the_hops_up(monkeypatch):
    facility = {"conn_type": "ssh", "host": "10.0.0.5", "port": 2222, "login": "alice",
                "extra": {"host_key": HOST_KEY, "key_file": "/k", "jump_host": "bastion_x"}}  # fmt: skip
    bastion = {"conn_type": "ssh", "host": "gw.example.org", "login": "bob",
               "extra": {"host_key": HOST_KEY, "key_file": "/b"}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_FACILITY_HOPS", json.dumps(facility))
    with pytest.raises(FacilityConnectionError, match="'facility_hops': jump host 'bastion_x' not found"):
        get_target("facility_hops")
    monkeypatch.setenv("AIRFLOW_CONN_BASTION_X", json.dumps(bastion))
    target = get_target("facility_hops")
    assert [j.address for j in target.jumps] == ["bob@gw.example.org:22"]
    assert target.jumps[0].known_hosts == f"gw.example.org {HOST_KEY}\n"


async def _silent_server():
    """A TCP listener that accepts and never says a word (an SSH banner never comes)."""
    held = []

    async def hold(reader, writer):
        held.append(writer)
        await asyncio.sleep(30)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def silent_target(port, conn_id="facility_x", **fields):
    return SSHTarget(conn_id=conn_id, host="127.0.0.1", port=port, username="alice",
                     known_hosts=known_hosts_line("127.0.0.1", port, HOST_KEY), connect_timeout=0.5,
                     **fields)  # fmt: skip


def test_a_connect_timeout_names_the_facility_the_address_and_the_limit():
    async def attempt():
        server, port = await _silent_server()
        async with server:
            with pytest.raises(FacilityConnectionError) as caught:
                await connect(silent_target(port))
        return port, caught.value

    port, error = asyncio.run(attempt())
    assert str(error) == (
        f"connection 'facility_x': connecting to alice@127.0.0.1:{port} timed out after 0.5 s "
        "(conn_timeout of 'facility_x')"
    )
    assert error.retryable is True


def test_a_connect_timeout_at_a_hop_names_the_hop():
    async def attempt():
        server, port = await _silent_server()
        gateway = silent_target(port, conn_id="bastion")
        target = silent_target(1, jump_conn_ids=("bastion",), jumps=(gateway,))
        async with server:
            with pytest.raises(FacilityConnectionError) as caught:
                await connect(target)
        return port, caught.value

    port, error = asyncio.run(attempt())
    assert str(error) == (
        f"connection 'facility_x': connecting to jump host 'bastion' (alice@127.0.0.1:{port}) timed out "
        "after 0.5 s (conn_timeout of 'bastion')"
    )
    assert error.retryable is True


def test_connect_refuses_hops_that_were_not_looked_up():
    target = silent_target(1, jump_conn_ids=("bastion",))
    with pytest.raises(FacilityConnectionError, match="not looked up"):
        asyncio.run(connect(target))
