"""A real Redis for tests: the Celery broker of the CeleryExecutor, on a loopback port.

``RedisServer`` runs Debian's ``redis-server`` (package ``redis-server``, which ``make setup``
installs; its own system service is not used) from a folder of its own under /tmp, listening on
``127.0.0.1:<free port>`` only, with a generated password and no persistence (no RDB snapshots,
no append-only file: a broker of a test leaves nothing on disk). The settings go in a 0600
config file, never on the command line, so the password does not show in ``ps``. ``url`` is the
broker URL to give Celery. ``stop()`` ends the server by PID; ``start()`` brings it back on the
same port and password (empty: nothing was persisted). As a context manager it starts, then
stops and deletes its folder.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

from xffl_testbed.airflow_instance import free_port
from xffl_testbed.processes import terminate, with_descendants

REDIS_SERVER = "redis-server"


class RedisError(RuntimeError):
    """Redis could not be found, started or reached; the message says why."""


def find_redis_server(name: str = REDIS_SERVER) -> Path:
    """The ``redis-server`` executable on PATH (or in /usr/bin, where Debian puts it)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if not found:
        raise RedisError(
            f"no {name} on PATH or in /usr/bin; install Debian's `redis-server` package "
            "(`make setup` does)"
        )
    return Path(found)


def redis_url(*, password: str, host: str, port: int, database: int = 0) -> str:
    """The ``redis://`` URL with the password percent-quoted (no user: Redis' default user)."""
    return f"redis://:{quote(password, safe='')}@{host}:{port}/{database}"


def redis_config(*, root: Path, host: str, port: int, password: str) -> str:
    """The ``redis.conf`` text: loopback only, no persistence, everything in ``root``."""
    if any(c.isspace() or c in "\"'\\" for c in password):
        raise ValueError("the Redis password must have no spaces, quotes or backslashes")
    return "\n".join(
        [
            f"bind {host}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            'save ""',  # no RDB snapshots
            "appendonly no",  # no append-only file
            f"dir {root}",
            f"pidfile {root / 'redis.pid'}",
            'logfile ""',  # stdout, which goes to redis.log
            "databases 16",
            f"requirepass {password}",
            "",
        ]
    )


class RedisServer:
    """One Redis server in its own folder, reached on ``127.0.0.1:port`` with a password.

    :param root: the folder for the config and the log; default a new ``/tmp/xffl-redis.*``
        (deleted by ``purge()`` and on leaving the ``with`` block).
    :param port: the TCP port; default a free one, kept across ``stop()``/``start()``.
    """

    def __init__(self, root: str | Path | None = None, *, port: int | None = None):
        self.binary = find_redis_server()
        self._owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="xffl-redis.", dir="/tmp")).resolve()
        self.config_file = self.root / "redis.conf"
        self.log_file = self.root / "redis.log"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The broker URL, ``redis://:PASSWORD@127.0.0.1:PORT/0``."""
        return redis_url(password=self.password, host=self.host, port=self.port)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 30) -> Self:
        if self.running:
            raise RedisError(f"Redis in {self.root} already runs (PID {self.process.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        written = self.config_file.with_suffix(".tmp")
        written.touch(mode=0o600)
        written.write_text(
            redis_config(root=self.root, host=self.host, port=self.port, password=self.password)
        )
        written.replace(self.config_file)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        self._wait_until_ready(timeout)
        return self

    def stop(self, *, grace: float = 15) -> None:
        """SIGTERM (Redis shuts down; nothing to save), then SIGKILL after ``grace``, by PID."""
        if self.process is None:
            return
        terminate(with_descendants([self.process.pid]), grace=grace, sig=signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired as error:
            raise RedisError(f"redis-server PID {self.process.pid} did not end") from error
        self.process = None

    def purge(self) -> None:
        """Stops the server and deletes its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._owns_root:
            self.purge()
        else:
            self.stop()

    # -- queries ---------------------------------------------------------------------------

    def client(self):
        """A ``redis.Redis`` client of this server (the package Celery's Redis transport uses)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),  # an answer or an error now: callers poll themselves
        )

    def ping(self) -> bool:
        """True when the server answers PING with our password."""
        import redis

        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def listening(self) -> bool:
        """True when something accepts TCP connections on ``host:port``."""
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def descendants(self) -> set[int]:
        return with_descendants([self.process.pid]) if self.running else set()

    # -- internals -------------------------------------------------------------------------

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisError(
                    f"redis-server exited with {self.process.returncode}; see {self.log_file}:\n"
                    f"{self._log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.1)
        raise RedisError(
            f"Redis not ready on {self.host}:{self.port} after {timeout:.0f} s:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"
