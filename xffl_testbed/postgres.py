"""A real PostgreSQL for tests: Airflow's metadata database on a loopback port.

``PostgresServer`` runs Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``) from a data
directory of its own under /tmp, as the unprivileged ``postgres`` system user (PostgreSQL
refuses to run as root), listening on ``127.0.0.1:<free port>`` with its socket in its own
folder. The first start runs ``initdb`` and makes a role and a database for Airflow with a
generated password; ``url`` is the SQLAlchemy URL to give Airflow. ``stop()`` ends the
postmaster and every backend it forked, by PID; ``start()`` brings it back on the same data and
port (for "database down, then back" tests). As a context manager it starts, then stops and
deletes its folder.
"""

from __future__ import annotations

import os
import pwd
import re
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

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised, started or queried; the message says why."""


def find_bin_dir(root: str | Path = POSTGRES_ROOT) -> Path:
    """The ``bin`` folder of the newest PostgreSQL under ``root`` (Debian's layout:
    ``<root>/<version>/bin/postgres``)."""
    versions = []
    for child in Path(root).glob("*/bin/postgres"):
        version = child.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version):
            versions.append((tuple(int(part) for part in version.split(".")), child.parent))
    if not versions:
        raise PostgresError(
            f"no PostgreSQL server under {root} (no <version>/bin/postgres); "
            "install Debian's `postgresql` package (`make setup` does)"
        )
    return max(versions)[1]


def sqlalchemy_url(*, user: str, password: str, host: str, port: int, database: str) -> str:
    """The psycopg2 SQLAlchemy URL, with user and password percent-quoted."""
    return (
        f"postgresql+psycopg2://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{host}:{port}/{quote(database, safe='')}"
    )


def postmaster_pid(data_dir: str | Path) -> int | None:
    """The PID on the first line of ``postmaster.pid``, or None when the file is absent."""
    try:
        first = Path(data_dir, "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    if not first.isdigit():
        raise PostgresError(f"{data_dir}/postmaster.pid does not start with a PID: {first!r}")
    return int(first)


class PostgresServer:
    """One PostgreSQL cluster in its own folder, reached on ``127.0.0.1:port``.

    :param root: the folder for data, socket and logs; default a new ``/tmp/xffl-postgres.*``
        (deleted by ``purge()`` and on leaving the ``with`` block).
    :param port: the TCP port; default a free one, kept across ``stop()``/``start()``.
    :param database: the database made for Airflow.
    :param role: the login role that owns it (its password is generated).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        port: int | None = None,
        database: str = "airflow",
        role: str = "airflow",
    ):
        for field, value in (("database", database), ("role", role)):
            if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
                raise ValueError(
                    f"PostgreSQL {field} name must match [a-z_][a-z0-9_]{{0,62}}, got {value!r}"
                )
        self.bin_dir = find_bin_dir()
        self._owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="xffl-postgres.", dir="/tmp")).resolve()
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_file = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.database = database
        self.role = role
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        # PostgreSQL refuses root: as root, run it as the Debian `postgres` system user.
        self._account = (
            pwd.getpwnam(SYSTEM_USER) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        )

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the Airflow database (``postgresql+psycopg2://...``)."""
        return sqlalchemy_url(
            user=self.role,
            password=self.password,
            host=self.host,
            port=self.port,
            database=self.database,
        )

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self.process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 60) -> Self:
        """Starts the server (``initdb`` and the Airflow role and database on the first start)."""
        if self.running:
            raise PostgresError(f"PostgreSQL in {self.root} already runs (PID {self.process.pid})")
        first_start = not (self.data_dir / "PG_VERSION").exists()
        if first_start:
            self._initdb()
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        with open(self.log_file, "ab") as log:  # the server keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D", str(self.data_dir),
                    "-h", self.host,
                    "-p", str(self.port),
                    "-k", str(self.socket_dir),
                    "-c", "max_connections=200",
                    "-c", "fsync=off",  # a test database: a crash may lose it, a stop does not
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                **self._as_account(),
            )  # fmt: skip
        self._wait_until_ready(timeout)
        if first_start:
            self._create_airflow_database()
        return self

    def stop(self, *, grace: float = 30) -> None:
        """Fast shutdown (SIGINT: running transactions are rolled back, clients cut off), then
        SIGKILL for anything of it still alive after ``grace``: the postmaster and every
        process below it."""
        if self.process is None:
            return
        pids = with_descendants([self.process.pid])
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        terminate(pids, grace=5, sig=signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired as error:
            raise PostgresError(f"postmaster PID {self.process.pid} did not end") from error
        self.process = None

    def purge(self) -> None:
        """Stops the server and deletes its folder (data included)."""
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

    def psql(self, sql: str, *, database: str | None = None, timeout: float = 60) -> str:
        """Runs ``sql`` as the superuser over the Unix socket; returns the unaligned output."""
        result = self._run(
            [
                str(self.bin_dir / "psql"),
                "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir),
                "-p", str(self.port),
                "-U", SUPERUSER,
                "-d", database or "postgres",
            ],
            stdin=sql,
            timeout=timeout,
        )  # fmt: skip
        return result.stdout

    def listening(self) -> bool:
        """True when something accepts TCP connections on ``host:port``."""
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    # -- internals -------------------------------------------------------------------------

    def _as_account(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {
            "user": self._account.pw_uid,
            "group": self._account.pw_gid,
            "extra_groups": [],
            "env": {
                "PATH": "/usr/bin:/bin",
                "HOME": str(self.root),
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
            },
        }

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _run(
        self, argv: list[str], *, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
            **self._as_account(),
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{Path(argv[0]).name} failed ({result.returncode}) for {self.root}:\n"
                f"{(result.stderr or result.stdout)[-3000:]}"
            )
        return result

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._chown(self.root)
        # Superuser only over the local socket (peer-less trust inside our own 0700 folder);
        # every TCP login needs a password.
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ]
        )  # fmt: skip

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with {self.process.returncode}; see {self.log_file}:\n{self._log_tail()}"
                )
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise PostgresError(
            f"PostgreSQL not ready on {self.host}:{self.port} after {timeout:.0f} s:\n{self._log_tail()}"
        )

    def _create_airflow_database(self) -> None:
        # psql variables quote the password (:'password') and the names (:"role").
        self.psql(
            f"\\set role {self.role}\n\\set password {self.password}\n"
            "CREATE ROLE :\"role\" LOGIN PASSWORD :'password';\n"
        )
        self.psql(f'CREATE DATABASE "{self.database}" OWNER "{self.role}" ENCODING \'UTF8\';\n')

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def descendants(self) -> set[int]:
        """The postmaster and every process below it (backends, checkpointer, walwriter...)."""
        return with_descendants([self.process.pid]) if self.running else set()
