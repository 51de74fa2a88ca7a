"""The Redis broker of the CeleryExecutor set-up (``xffl_testbed.redis_server``).

Starts: one ``redis-server`` (Debian's) per live test, from a folder of its own under /tmp, on a
free loopback port; stopped by PID in each test. The live tests are marked like the PostgreSQL
ones: they need a server from a Debian package that ``make setup`` installs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from xffl_testbed.processes import alive
from xffl_testbed.redis_server import RedisError, RedisServer, redis_config, redis_url

live = pytest.mark.usefixtures("starts_redis")


def test_redis_config_is_loopback_only_and_keeps_nothing_on_disk():
    assert redis_config(root=Path("/tmp/r"), host="127.0.0.1", port=6390, password="abc123") == (
        "bind 127.0.0.1\n"
        "port 6390\n"
        "protected-mode yes\n"
        "daemonize no\n"
        'save ""\n'
        "appendonly no\n"
        "dir /tmp/r\n"
        "pidfile /tmp/r/redis.pid\n"
        'logfile ""\n'
        "databases 16\n"
        "requirepass abc123\n"
    )


@pytest.mark.parametrize("password", ["a b", 'a"b', "a'b", "a\\b", "a\nb"])
def test_redis_config_refuses_a_password_it_could_not_quote(password):
    with pytest.raises(ValueError, match="no spaces, quotes or backslashes"):
        redis_config(root=Path("/tmp/r"), host="127.0.0.1", port=1, password=password)


def test_redis_url_quotes_the_password():
    assert redis_url(password="p@ss/w:rd", host="127.0.0.1", port=6390) == (
        "redis://:p%40ss%2Fw%3Ard@127.0.0.1:6390/0"
    )


@live
def test_a_server_of_our_own_answers_only_with_its_password_and_leaves_nothing():
    server = RedisServer()
    root = server.root
    with server:
        pid = server.pid
        assert alive(pid) and server.ping()
        assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        # the password is in a 0600 file, not on the command line
        assert server.password not in Path(f"/proc/{pid}/cmdline").read_text()
        assert (root / "redis.conf").stat().st_mode & 0o077 == 0
        client = server.client()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.set("xffl", "1")
        assert client.get("xffl") == b"1"
        # without the password: refused
        import redis

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=None).get("xffl")
    assert not alive(pid)
    assert not root.exists()


@live
def test_stop_and_start_keep_port_and_password_and_lose_the_data(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        first_pid, port, url = server.pid, server.port, server.url
        server.client().set("k", "v")
        server.stop()
        assert not alive(first_pid) and not server.listening()
        server.start()
        assert server.pid != first_pid and server.port == port and server.url == url
        assert server.client().get("k") is None  # no persistence
        assert not list((tmp_path / "redis").glob("*.rdb"))
        assert not list((tmp_path / "redis").glob("appendonly*"))
    finally:
        server.stop()
    assert not alive(first_pid) and server.pid is None
    assert (tmp_path / "redis").is_dir()  # a root given by the caller stays


@live
def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with RedisServer() as taken:
        clash = RedisServer(tmp_path / "clash", port=taken.port)
        with pytest.raises(RedisError, match=r"redis-server exited with 1; see .*redis.log"):
            clash.start(timeout=20)
        assert clash.process.poll() is not None
        assert taken.ping()


@live
def test_a_killed_server_is_reported_as_not_running():
    with RedisServer() as server:
        pid = server.pid
        os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=5)
        assert not server.running and server.pid is None and not server.ping()
    assert not alive(pid)
