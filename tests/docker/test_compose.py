"""The compose deployment agrees with the repository and with the native set-up the tests run.

No Docker engine runs here, so ``docker/compose.yaml`` and the images are checked, not started:
``tests/docker/compose_check.py`` reads them against the Makefile, the lock files, the facility
scripts, the keys that ``docker/make-keys.sh`` really writes (it runs here, into a copy of
``docker/``), the federation config and the installed Airflow (its CLI parser and its
configuration options). Then copies of ``docker/`` are broken on purpose, one thing at a time,
to show the checker names what broke.

Starts: ``docker/make-keys.sh`` (ssh-keygen) and a Python subprocess that imports Airflow; no
daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.docker.compose_check import check_deployment
from tests.docker.deployment_files import makefile_locks, parse_dockerfile, shell_calls

REPO = Path(__file__).resolve().parents[2]
FEDERATION_DAG = REPO / "dags" / "xffl_federation.py"


def deployment_copy(root: Path, *, make_keys: bool = True) -> Path:
    """A repository in ``root`` whose ``docker/`` is a real copy (keys made there) and whose other
    top-level entries link to this checkout; returns the copy's ``docker`` folder."""
    repo = root / "repo"
    repo.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("docker", ".git"):
            (repo / entry.name).symlink_to(entry)
    shutil.copytree(
        REPO / "docker",
        repo / "docker",
        ignore=shutil.ignore_patterns("keys", ".env", "__pycache__"),
    )
    if make_keys:
        result = subprocess.run(
            [str(repo / "docker" / "make-keys.sh")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    return repo / "docker"


def current_problems(docker: Path, **kwargs) -> list[str]:
    return check_deployment(docker, **kwargs)


@pytest.fixture(scope="module")
def docker_copy(tmp_path_factory) -> Path:
    return deployment_copy(tmp_path_factory.mktemp("deployment"))


def test_the_compose_deployment_agrees_with_the_repository(docker_copy):
    assert current_problems(docker_copy) == []


def test_the_image_ships_the_federation_dag():
    dockerfile = parse_dockerfile(
        (REPO / "docker/airflow/Dockerfile").read_text(), "docker/airflow/Dockerfile"
    )
    assert dockerfile.copied.get("/opt/airflow/dags") == "dags/"
    assert "build_federation_dag" in FEDERATION_DAG.read_text()
    # compose.yaml names the config through XFFL_FEDERATION_CONFIG: the DAG side must read it.
    readers = [
        path
        for path in [*(REPO / "dags").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
        if "XFFL_FEDERATION_CONFIG" in path.read_text(errors="replace")
    ]
    assert readers, "nothing under dags/ or plugins/ reads XFFL_FEDERATION_CONFIG"


def test_make_keys_writes_what_the_connections_pin(docker_copy):
    keys = docker_copy / "keys"
    assert sorted(p.name for p in keys.iterdir() if p.is_dir()) == ["site1", "site2"]
    for path in keys.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    env = (keys / "airflow.env").read_text()
    line = next(l for l in env.splitlines() if l.startswith("AIRFLOW_CONN_FACILITY_SITE2="))
    conn = json.loads(line.split("=", 1)[1].strip("'"))
    assert conn["extra"]["host_key"] == " ".join(
        (keys / "site2/ssh_host_ed25519_key.pub").read_text().split()[:2]
    )
    assert conn["extra"]["no_host_key_check"] is False
    # Made once: a second run refuses to replace the keys the connections pin.
    again = subprocess.run(
        [str(docker_copy / "make-keys.sh")], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 1 and "made once" in again.stderr
    assert (keys / "airflow.env").read_text() == env


def test_no_key_material_is_committed():
    tracked = subprocess.run(
        ["git", "ls-files", "docker"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert not [f for f in tracked.split() if f.startswith("docker/keys/") or f == "docker/.env"]
    for name in tracked.split():
        text = (REPO / name).read_text(errors="replace")
        assert "PRIVATE KEY-----" not in text, name


@pytest.mark.parametrize(
    "script",
    ["facility/entrypoint.sh", "facility/lib.sh", "facility/install-packages.sh", "facility/down"],
)
def test_a_renamed_script_is_reported_by_name(tmp_path, script):
    docker = deployment_copy(tmp_path)
    (docker / script).rename(docker / f"{script}.renamed")
    problems = current_problems(docker, airflow=False)
    assert any(f"docker/{script}" in p for p in problems), problems


def mutated(tmp_path: Path, path: str, old: str, new: str, *, make_keys: bool = True) -> Path:
    docker = deployment_copy(tmp_path, make_keys=make_keys)
    text = (docker / path).read_text()
    assert old in text, f"{old!r} not in {path}"
    (docker / path).write_text(text.replace(old, new))
    return docker


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        # a lib.sh function the native test bed and the entrypoint share
        ("facility/lib.sh", "start_munge() {", "start_munged() {", "does not define start_munge"),
        # the facility's sshd port in compose no longer matches image, entrypoint and connection
        (
            "compose.yaml",
            'FACILITY_NAME: site2\n      SSH_PORT: "22"',
            'FACILITY_NAME: site2\n      SSH_PORT: "2222"',
            "SSH_PORT 2222",
        ),
        # a lock file the Makefile does not use
        (
            "facility/Dockerfile",
            "-r requirements-facility.lock",
            "-r requirements.lock",
            "requirements-facility.lock",
        ),
        # a facility the compose file does not run
        (
            "config/federation.yaml",
            "  - name: site2\n    conn_id: facility_site2",
            "  - name: site3\n    conn_id: facility_site3",
            "facility_site3",
        ),
        # the keys of another facility mounted
        (
            "compose.yaml",
            "./keys/site2:/etc/xffl/keys:ro",
            "./keys/site1:/etc/xffl/keys:ro",
            "the facility's keys are ./keys/site2",
        ),
        # the Airflow services no longer read the shared settings
        (
            "compose.yaml",
            "    - config/airflow.env\n",
            "",
            "does not read the shared settings docker/config/airflow.env",
        ),
        # a shared option set a second time, in compose's environment
        (
            "compose.yaml",
            '    AIRFLOW__API__PORT: "8080"\n',
            '    AIRFLOW__API__PORT: "8080"\n    AIRFLOW__CORE__EXECUTOR: LocalExecutor\n',
            "sets AIRFLOW__CORE__EXECUTOR again, which docker/config/airflow.env sets",
        ),
        # a latency value the native test bed does not use
        (
            "config/airflow.env",
            "SCHEDULER_IDLE_SLEEP_TIME=0.2",
            "SCHEDULER_IDLE_SLEEP_TIME=0.05",
            "the test bed's LATENCY_SETTINGS say '0.2'",
        ),
        # Airflow's default heartbeat timeout: a dead worker's task waits five minutes
        (
            "config/airflow.env",
            "TASK_INSTANCE_HEARTBEAT_TIMEOUT=30",
            "TASK_INSTANCE_HEARTBEAT_TIMEOUT=300",
            "TASK_INSTANCE_HEARTBEAT_TIMEOUT 300 s: keep it between",
        ),
        # a killed worker's message acknowledged at delivery: lost
        (
            "config/airflow.env",
            "TASK_ACKS_LATE=True",
            "TASK_ACKS_LATE=False",
            "AIRFLOW__CELERY__TASK_ACKS_LATE must be True",
        ),
        # a group the native test bed reads, gone
        (
            "config/airflow.env",
            "# --- group: workers ---",
            "# workers",
            "docker/config/airflow.env: no group workers",
        ),
    ],
)
def test_a_disagreement_is_reported(tmp_path, path, old, new, expected):
    problems = current_problems(mutated(tmp_path, path, old, new), airflow=False)
    assert any(expected in p for p in problems), problems


def test_a_pinned_host_key_that_is_not_the_facility_key_is_reported(tmp_path):
    docker = deployment_copy(tmp_path)
    keys = docker / "keys"
    env = (keys / "airflow.env").read_text()
    site1 = " ".join((keys / "site1/ssh_host_ed25519_key.pub").read_text().split()[:2])
    site2 = " ".join((keys / "site2/ssh_host_ed25519_key.pub").read_text().split()[:2])
    (keys / "airflow.env").write_text(env.replace(site2, site1))
    problems = current_problems(docker, airflow=False)
    assert any(
        "AIRFLOW_CONN_FACILITY_SITE2: host_key is not the key in docker/keys/site2" in p
        for p in problems
    ), problems


def test_missing_keys_are_reported(tmp_path):
    problems = current_problems(deployment_copy(tmp_path, make_keys=False), airflow=False)
    assert any("keys/airflow.env" in p and "make-keys.sh" in p for p in problems), problems


def test_an_unknown_airflow_option_and_command_are_reported(tmp_path):
    docker = mutated(
        tmp_path,
        "config/airflow.env",
        "AIRFLOW__CORE__LOAD_EXAMPLES",
        "AIRFLOW__CORE__LOAD_EXAMPLE",
    )
    compose = (docker / "compose.yaml").read_text()
    (docker / "compose.yaml").write_text(
        compose.replace(
            '["airflow", "celery", "worker"]', '["airflow", "celery", "wroker"]'
        ).replace(
            'AIRFLOW__API__PORT: "8080"',
            'AIRFLOW__API__PORT: "8080"\n    AIRFLOW__API__PROT: "1"',
        )
    )
    problems = current_problems(docker)
    # each unknown option is reported in the file that sets it
    assert (
        "docker/config/airflow.env: AIRFLOW__CORE__LOAD_EXAMPLE: Airflow has no option [core] load_example"
        in problems
    )
    assert "docker/compose.yaml: AIRFLOW__API__PROT: Airflow has no option [api] prot" in problems
    assert any("`airflow celery wroker` is not a valid Airflow command" in p for p in problems), (
        problems
    )


# -- the parsers, on literal text ----------------------------------------------------------------


def test_parse_dockerfile_reads_copy_env_expose_and_entrypoint():
    dockerfile = parse_dockerfile(
        "FROM debian:bookworm-slim\n"
        "# a comment\n"
        "COPY a/x.sh \\\n    a/lib.sh /opt/t/\n"
        "COPY requirements.lock ./\n"
        "COPY --chown=1:1 dags/ /opt/airflow/dags/\n"
        "ENV A=1 \\\n    B=two\n"
        "EXPOSE 22 8080/tcp\n"
        "RUN /opt/t/x.sh && pip install -r requirements.lock\n"
        'ENTRYPOINT ["/opt/t/x.sh"]\n',
        "Dockerfile",
    )
    assert dockerfile.copied == {
        "/opt/t/x.sh": "a/x.sh",
        "/opt/t/lib.sh": "a/lib.sh",
        "./requirements.lock": "requirements.lock",
        "/opt/airflow/dags": "dags/",
    }
    assert dockerfile.env == {"A": "1", "B": "two"}
    assert dockerfile.expose == {"22", "8080"}
    assert dockerfile.entrypoint == ["/opt/t/x.sh"]
    assert dockerfile.runs() == ["/opt/t/x.sh && pip install -r requirements.lock"]


def test_makefile_locks_reads_both_virtualenv_rules():
    makefile = (
        "$(VENV)/.installed: requirements.lock\n"
        "\t@$(VENV)/bin/pip install -q -r requirements.lock $(PIP_QUIET)\n"
        "$(FACILITY_VENV)/.installed: requirements-facility.lock\n"
        "\t@$(FACILITY_VENV)/bin/pip install -q -r requirements-facility.lock $(PIP_QUIET)\n"
    )
    assert makefile_locks(makefile) == {
        "VENV": "requirements.lock",
        "FACILITY_VENV": "requirements-facility.lock",
    }


def test_shell_calls_ignores_comments_and_definitions():
    script = "# start_munge is not called here\nstart_munge_x() { :; }\n    create_user u h k\nstart_facility\n"
    assert shell_calls(script, ("start_munge", "create_user", "start_facility")) == {
        "create_user",
        "start_facility",
    }


def test_the_compose_file_is_plain_yaml_with_merge_keys():
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    worker = compose["services"]["airflow-worker"]
    assert (
        worker["build"]["dockerfile"] == "docker/airflow/Dockerfile"
    )  # from the x-airflow-common anchor
    assert {"site1", "site2", "airflow-api-server"} <= set(worker["depends_on"])


def test_the_compose_federation_config_loads_with_the_dag_s_own_loader(monkeypatch):
    """docker/config/federation.yaml is valid for the federation DAG (not only in shape)."""
    from xffl_airflow.federation.config import load_config

    config = load_config(REPO / "docker" / "config" / "federation.yaml")
    assert [f.connection_id for f in config.facilities] == [
        f"facility_{f.name}" for f in config.facilities
    ]


# -- hardening: secrets, Redis' password, networks, ports (tests/docker/hardening_check.py) ------

UID_REQUIRED = "${AIRFLOW_UID:?run docker/make-keys.sh first: it writes docker/.env and docker/keys/}"
REDIS_NETWORKS = "      - redis_conf\n    networks:\n      - control-plane\n"


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        # Redis without its password, or with it on the command line (ps shows it)
        ("compose.yaml", '["redis-server", "/run/secrets/redis_conf"]', '["redis-server"]',
         "does not start redis-server with its config from a secret"),
        ("compose.yaml", '["redis-server", "/run/secrets/redis_conf"]',
         '["redis-server", "/run/secrets/redis_conf", "--requirepass", "x"]',
         "passes the password on the command line"),
        ("keys/redis.conf", "requirepass ", "# requirepass ", "must set one requirepass"),
        ("keys/celery_broker_url", "redis://:", "redis://:wrong", "does not carry the password of docker/keys/redis.conf"),
        ("compose.yaml", "REDISCLI_AUTH=", "NOAUTH=", "healthcheck does not authenticate"),
        # the facilities' networks reach only their sshd, the worker and the triggerer
        ("compose.yaml", REDIS_NETWORKS, REDIS_NETWORKS + "      - site1-net\n",
         "service redis: is on facility network site1-net"),
        ("compose.yaml", "    networks:\n      - site1-net\n", "    networks:\n      - site1-net\n      - control-plane\n",
         "service site1: must be on exactly one network of its own"),
        ("compose.yaml", "    networks:\n      - site2-net\n", "    networks:\n      - site1-net\n",
         "service site1: shares network site1-net with site2"),
        ("compose.yaml", "  site1-net:\n    internal: true\n", "  site1-net:\n",
         "network site1-net: must be internal: true"),
        ("compose.yaml", "    secrets:\n      - postgres_password\n    networks:\n      - control-plane\n",
         "    secrets:\n      - postgres_password\n", "service postgres: names no networks"),
        ("compose.yaml", "    command: [\"airflow\", \"triggerer\"]\n    # its Slurm triggers poll the facilities over SSH\n"
         "    networks:\n      - control-plane\n      - site1-net\n      - site2-net\n",
         "    command: [\"airflow\", \"triggerer\"]\n    networks:\n      - control-plane\n      - site1-net\n",
         "service airflow-triggerer: is not on site2-net"),
        # ports bind to loopback unless the user opts out
        ("compose.yaml", '"${XFFL_BIND_ADDRESS:-127.0.0.1}:8080:8080"', '"8080:8080"',
         "publishes '8080:8080': bind it to ${XFFL_BIND_ADDRESS:-127.0.0.1}"),
        # no default or literal password, key or URL with a password
        ("compose.yaml", "POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password", "POSTGRES_PASSWORD: airflow",
         "service postgres: sets POSTGRES_PASSWORD to a value"),
        ("compose.yaml", "AIRFLOW__CORE__FERNET_KEY_CMD: cat /run/secrets/fernet_key",
         "AIRFLOW__CORE__FERNET_KEY: 46BKJoQYlPPOexq0OhDZnIlNepKFf87WFwLbfzqDDho=",
         "sets AIRFLOW__CORE__FERNET_KEY itself: read it from a secret"),
        ("compose.yaml", "AIRFLOW__CELERY__BROKER_URL_CMD: cat /run/secrets/celery_broker_url",
         "AIRFLOW__CELERY__BROKER_URL: redis://:hunter2@redis:6379/0", "holds a URL with a password"),
        ("compose.yaml", "AIRFLOW__API_AUTH__JWT_SECRET_CMD: cat /run/secrets/jwt_secret",
         "AIRFLOW__API_AUTH__JWT_SECRET_CMD: echo not-so-secret", "read secrets as `cat /run/secrets/NAME`"),
        ("compose.yaml", '    AIRFLOW__API__PORT: "8080"\n',
         '    AIRFLOW__API__PORT: "8080"\n    XFFL_TOKEN: ${XFFL_TOKEN:-changeme}\n',
         "${XFFL_TOKEN} has a default ('changeme')"),
        ("compose.yaml", UID_REQUIRED, "${AIRFLOW_UID:-50000}",
         "${AIRFLOW_UID} must stop compose when docker/.env is missing"),
        ("config/airflow.env", "AIRFLOW__CELERY__WORKER_CONCURRENCY=8",
         "AIRFLOW__CELERY__WORKER_CONCURRENCY=8\nAIRFLOW__CORE__FERNET_KEY=x",
         "sets AIRFLOW__CORE__FERNET_KEY: secrets do not belong in the shared settings"),
        ("keys/fernet_key", "=", "=\n", "docker/keys/fernet_key: ends with a newline"),
        ("keys/fernet_key", "=", "", "is not a Fernet key"),
    ],
)  # fmt: skip
def test_a_hardening_regression_is_reported(tmp_path, path, old, new, expected):
    problems = current_problems(mutated(tmp_path, path, old, new), airflow=False)
    assert any(expected in p for p in problems), problems


def test_a_missing_secret_file_is_reported_by_name(tmp_path):
    docker = deployment_copy(tmp_path)
    (docker / "keys" / "jwt_secret").unlink()
    (docker / "keys" / "redis.conf").unlink()
    problems = current_problems(docker, airflow=False)
    assert any("docker/keys/jwt_secret: missing: the secret jwt_secret" in p for p in problems), problems
    assert any("docker/keys/redis.conf: missing: Redis' config" in p for p in problems), problems


def test_the_secrets_are_random_files_that_make_keys_writes_once(docker_copy):
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    files = {name: docker_copy / spec["file"] for name, spec in compose["secrets"].items()}
    values = {name: path.read_text() for name, path in files.items()}
    password = values["postgres_password"]
    assert len(password) >= 32 and f":{password}@postgres:5432/" in values["sql_alchemy_conn"]
    redis = values["redis_conf"].split("requirepass ", 1)[1].split()[0]
    assert values["celery_broker_url"] == f"redis://:{redis}@redis:6379/0" and redis != password
    assert len({values["jwt_secret"], values["api_secret_key"], password, redis}) == 4
    for name, path in files.items():
        assert path.stat().st_mode & 0o077 == 0, name
    text = (REPO / "docker/compose.yaml").read_text() + (REPO / "docker/config/airflow.env").read_text()
    for value in (password, redis, values["fernet_key"], values["jwt_secret"]):
        assert value not in text
    # the Airflow options read them through _CMD, which Airflow allows for these options only
    from airflow.configuration import conf

    for key in as_dict_env(compose):
        if key.endswith("_CMD"):
            section, option = key.removeprefix("AIRFLOW__").removesuffix("_CMD").lower().split("__")
            assert (section, option) in conf.sensitive_config_values, key


def as_dict_env(compose: dict) -> dict[str, str]:
    from tests.docker.deployment_files import as_dict

    return as_dict(compose["x-airflow-common"]["environment"])
