"""Test session set-up.

Before anything imports Airflow, this points AIRFLOW_HOME at a fresh temporary folder with an
absolute SQLite URL and examples off. Fixtures start the real services lazily, once per
session, and stop them by PID at the end:

- ``testbed``: two local facilities (``docker/facility/up``): per facility a slurmctld, a
  slurmd and an sshd, plus one munged; stopped by ``docker/facility/down``.
- ``airflow_db``: the metadata database of the session's AIRFLOW_HOME, migrated once.
- ``airflow_instance``: api-server, scheduler, dag-processor and triggerer on that home, with
  the facilities' connections and two users: ``admin`` and ``trigger`` (role ``user``: may
  trigger runs); DAG files are installed into its dags folder per test.
- ``postgres``: a PostgreSQL server of its own (``xffl_testbed.postgres``) on a loopback port;
  ``airflow_on_postgres``: a second Airflow, on that database, with a triggerer of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The session Airflow's user with the role ``user`` (may trigger runs, write XCom, clear tasks).
TRIGGER_USER = "trigger"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="xffl-airflow-home."))
_DAGS = _AIRFLOW_HOME / "dags"
_DAGS.mkdir()
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(_DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
)


#: What each fixture starts, as markers of every test that uses it (directly or through another
#: fixture): ``make test-unit`` deselects them all. Tests that start a service themselves ask
#: for the matching ``starts_*`` fixture, which starts nothing and only says so.
FIXTURE_MARKERS = {
    "testbed": ("slurm",),
    "starts_facilities": ("slurm",),
    "airflow_instance": ("airflow_live",),
    "airflow_on_postgres": ("airflow_live",),
    "starts_airflow": ("airflow_live",),
    "postgres": ("postgres",),
    "starts_postgres": ("postgres",),
    "starts_redis": ("redis",),
    "browser": ("browser",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            for marker in FIXTURE_MARKERS.get(name, ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def starts_facilities():
    """The test starts local facilities of its own (Slurm, sshd: root)."""
    if os.geteuid() != 0:
        pytest.fail("the local facilities need root (useradd, Slurm daemons); run `make test` as root")


@pytest.fixture(scope="session")
def starts_postgres():
    """The test starts a PostgreSQL server of its own."""


@pytest.fixture(scope="session")
def starts_redis():
    """The test starts a Redis server of its own."""


@pytest.fixture(scope="session")
def starts_airflow():
    """The test starts Airflow's services of its own."""


def facility_python() -> str:
    """The facility-side Python (no Airflow) that `make` installs; jobs at the facilities run it.

    Missing under ``make test-unit`` (``XFFL_TEST_TIER=unit``, which builds no facility
    environment), the test is skipped, saying so; anywhere else it fails."""
    from xffl_testbed.facilities import facility_python as default_facility_python

    python = default_facility_python()
    if not Path(python).exists():
        message = f"no facility environment at {python}: `make setup` or `make test` builds it"
        if os.environ.get("XFFL_TEST_TIER") == "unit":
            pytest.skip(message)
        pytest.fail(message)
    return python


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """Migrates the session's SQLite metadata database once."""
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=600)
    return airflow_home


@pytest.fixture(scope="session")
def testbed():
    """Two local facilities, ``site1`` and ``site2``, for the whole session."""
    from xffl_testbed.facilities import Testbed

    if os.geteuid() != 0:
        pytest.fail("the local facilities need root (useradd, Slurm daemons); run `make test` as root")
    bed = Testbed.up(2, names=["site1", "site2"], python=facility_python())
    try:
        yield bed
    finally:
        bed.down(purge=True)


@pytest.fixture(scope="session")
def airflow_instance(airflow_db: Path, testbed):
    """A real Airflow (api-server, scheduler, dag-processor, triggerer) reaching the facilities."""
    from xffl_testbed.airflow_instance import AirflowInstance

    instance = AirflowInstance(
        airflow_db,
        dags_folder=_DAGS,
        env={**testbed.airflow_env(), "XFFL_FACILITY_PYTHON": facility_python()},
        sql_alchemy_conn=os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        # a person who may trigger runs (SimpleAuthManager's role "user"), as compose runs it
        users={TRIGGER_USER: "user"},
    )
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def install_dag(airflow_instance):
    """Copies a DAG file into the running instance's dags folder and waits until it is parsed."""

    def install(path: str | Path, dag_id: str):
        shutil.copy(path, _DAGS / Path(path).name)
        airflow_instance.wait_for_dag(dag_id, timeout=180, dag_file=_DAGS / Path(path).name)
        return airflow_instance

    return install


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL for the session (initdb, own data folder, loopback port), stopped by PID."""
    from xffl_testbed.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def airflow_on_postgres(postgres, testbed, tmp_path_factory):
    """A real Airflow (api-server, scheduler, dag-processor, triggerer) on the session's PostgreSQL."""
    from xffl_testbed.airflow_instance import AirflowInstance

    home = tmp_path_factory.mktemp("airflow-on-postgres")
    dags = home / "dags"
    dags.mkdir()
    signals = home / "signals"
    signals.mkdir()
    instance = AirflowInstance(
        home,
        dags_folder=dags,
        env={**testbed.airflow_env(), "XFFL_FACILITY_PYTHON": facility_python(), "XFFL_OUTAGE_SIGNALS": str(signals)},
        sql_alchemy_conn=postgres.url,
        parallelism=8,
    )
    instance.migrate()
    instance.start(timeout=240)
    try:
        yield instance
    finally:
        instance.stop()
