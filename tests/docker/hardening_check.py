"""Checks that ``docker/compose.yaml`` is hardened, read statically (no Docker engine here):

- secrets: no password or key has a default or a literal value anywhere (compose file,
  ``config/airflow.env``); each comes from a compose secret whose file ``make-keys.sh`` wrote
  under ``keys/`` (PostgreSQL through ``POSTGRES_PASSWORD_FILE``, Airflow through
  ``AIRFLOW__..._CMD: cat /run/secrets/NAME``); compose stops without ``docker/.env``
  (``${AIRFLOW_UID:?...}``);
- Redis requires a password (``requirepass`` in its config, a secret), the broker URL carries
  it and the health check authenticates;
- networks: every service names its networks; PostgreSQL, Redis and every Airflow service but
  the worker and the triggerer are on the control plane only; each facility is alone on its own
  ``internal`` network with the worker and the triggerer;
- published ports bind to ``${XFFL_BIND_ADDRESS:-127.0.0.1}``.

``secret_values`` resolves the ``_CMD`` options to the secret files' contents, so that the other
checks (URLs, passwords) read the values the services will see.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.docker.deployment_files import Findings, as_dict, service_argv

# Options that hold a secret: each must come from a secret file, through its _CMD form.
SECRET_OPTIONS = (
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
)
SECRETS_DIR = "/run/secrets/"
BIND = "${XFFL_BIND_ADDRESS:-127.0.0.1}"
CONTROL_PLANE_ONLY = ("postgres", "redis")
# Airflow services that log in at the facilities: the worker (transfers, sbatch) and the
# triggerer (the Slurm triggers' polls).
FACILITY_CLIENTS = ("celery worker", "triggerer")
SECRETISH = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|(?:^|_)KEY(?:$|_)|_CONN$|_URL$|BACKEND$", re.IGNORECASE
)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:([^@/\s'\"]+)@", re.IGNORECASE)


def secret_files(c: Findings, compose: dict) -> dict[str, Path]:
    """Secret name -> its file (``secrets: NAME: file: PATH``, relative to ``docker/``)."""
    files = {}
    for name, spec in (compose.get("secrets") or {}).items():
        if not isinstance(spec, dict) or not spec.get("file"):
            c.problem("docker/compose.yaml", f"secret {name} is not read from a file")
            continue
        files[name] = c.docker / spec["file"]
    return files


def _cat_secret(command: str) -> str | None:
    """NAME when ``command`` is ``cat /run/secrets/NAME``."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if len(argv) == 2 and argv[0] == "cat" and argv[1].startswith(SECRETS_DIR):
        return argv[1][len(SECRETS_DIR) :]
    return None


def secret_values(c: Findings, compose: dict, airflow_services: dict) -> dict[str, tuple[str, str]]:
    """For every ``AIRFLOW__X_CMD: cat /run/secrets/NAME`` of the Airflow services:
    ``AIRFLOW__X`` -> (the secret file's text, ``docker/<file>``). Problems: a _CMD that is not
    such a ``cat``, a secret the service does not mount, a missing file, a final newline."""
    files = secret_files(c, compose)
    values: dict[str, tuple[str, str]] = {}
    for name, service in airflow_services.items():
        where = f"docker/compose.yaml service {name}"
        mounted = {
            s if isinstance(s, str) else s.get("source") for s in service.get("secrets") or []
        }
        for key, command in as_dict(service.get("environment")).items():
            if not key.endswith("_CMD"):
                continue
            secret = _cat_secret(command)
            if secret is None:
                c.problem(where, f"{key} is {command!r}: read secrets as `cat {SECRETS_DIR}NAME`")
                continue
            if secret not in mounted:
                c.problem(
                    where, f"{key} reads {SECRETS_DIR}{secret}, a secret the service does not mount"
                )
                continue
            path = files.get(secret)
            if path is None:
                c.problem(
                    "docker/compose.yaml", f"secret {secret} ({key}) is not declared under secrets:"
                )
                continue
            if not path.is_file():
                c.problem(
                    c.rel(path), f"missing: the secret {secret} ({key}); run docker/make-keys.sh"
                )
                continue
            text = path.read_text()
            if text != text.rstrip("\n"):
                c.problem(
                    c.rel(path),
                    f"ends with a newline, which Airflow's {key} would keep in the value",
                )
            values[key[: -len("_CMD")]] = (text, c.rel(path))
    return values


def check_hardening(c: Findings, compose: dict, airflow_services: dict, facility_services: dict,
                    airflow_env: dict, shared_settings: dict[str, str]) -> None:  # fmt: skip
    services: dict = compose.get("services") or {}
    _check_no_default_secrets(c, compose, services, airflow_env, shared_settings)
    _check_redis(c, compose, services, airflow_env)
    _check_networks(c, compose, services, airflow_services, facility_services)
    _check_ports(c, services)


def _check_no_default_secrets(c, compose, services, airflow_env, shared_settings) -> None:
    text = (c.docker / "compose.yaml").read_text()
    for match in INTERPOLATION.finditer(text):
        name, operator, rest = match.groups()
        if operator in (":-", "-") and SECRETISH.search(name):
            c.problem(
                "docker/compose.yaml",
                f"${{{name}}} has a default ({rest!r}): no secret may have one",
            )
        if name == "AIRFLOW_UID" and operator not in (":?", "?"):
            c.problem("docker/compose.yaml",
                      "${AIRFLOW_UID} must stop compose when docker/.env is missing: write ${AIRFLOW_UID:?...}")  # fmt: skip
    for found in URL_PASSWORD.finditer(text):
        c.problem(
            "docker/compose.yaml",
            f"holds a URL with a password ({found.group(0)}...): use a secret",
        )
    for key, value in shared_settings.items():
        if key.removesuffix("_CMD") in SECRET_OPTIONS or SECRETISH.search(key.split("__")[-1]):
            c.problem(
                "docker/config/airflow.env",
                f"sets {key}: secrets do not belong in the shared settings",
            )
        if URL_PASSWORD.search(value):
            c.problem("docker/config/airflow.env", f"{key} holds a URL with a password")
    for name, service in services.items():
        where = f"docker/compose.yaml service {name}"
        environment = as_dict(service.get("environment"))
        for key in SECRET_OPTIONS:
            if key in environment:
                c.problem(where, f"sets {key} itself: read it from a secret ({key}_CMD)")
        for key, value in environment.items():
            if re.search(r"PASSWORD$|SECRET$|_KEY$", key) and value:
                c.problem(
                    where, f"sets {key} to a value: read it from a secret file ({key}_FILE or _CMD)"
                )
        if service.get("image", "").startswith("postgres"):
            secret = environment.get("POSTGRES_PASSWORD_FILE", "")
            if not secret.startswith(SECRETS_DIR):
                c.problem(where, f"POSTGRES_PASSWORD_FILE must name a secret under {SECRETS_DIR}")
            if any("postgres" in str(e) for e in service.get("env_file") or []):
                c.problem(where, "reads its password from an env_file: use POSTGRES_PASSWORD_FILE")
    for key in SECRET_OPTIONS:
        if key not in airflow_env:
            c.problem("docker/compose.yaml", f"{key} is not set from a secret ({key}_CMD)")
        elif not airflow_env[key]:
            c.problem("docker/compose.yaml", f"{key} is empty")
    fernet = airflow_env.get("AIRFLOW__CORE__FERNET_KEY")
    if fernet:
        try:
            from cryptography.fernet import Fernet

            Fernet(fernet.encode())
        except ValueError:
            c.problem("docker/keys/fernet_key", "is not a Fernet key (32 bytes, URL-safe base64)")
    if str(airflow_env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "")).lower() == "true":
        c.problem(
            "docker/compose.yaml", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS lets anyone in"
        )
    passwords = c.docker / "keys" / "passwords.json"
    users = [
        u.split(":")[0]
        for u in airflow_env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "").split(",")
        if u
    ]
    if passwords.is_file():
        import json

        known = json.loads(passwords.read_text() or "{}")
        for user in users:
            if len(str(known.get(user, ""))) < 16:
                c.problem(
                    "docker/keys/passwords.json", f"has no generated password for UI user {user}"
                )


def _check_redis(c, compose, services, airflow_env) -> None:
    redis = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("redis")}
    if not redis:
        c.problem("docker/compose.yaml", "no Redis service")
        return
    files = {name: c.docker / spec.get("file", "") for name, spec in (compose.get("secrets") or {}).items()
             if isinstance(spec, dict)}  # fmt: skip
    for name, service in redis.items():
        where = f"docker/compose.yaml service {name}"
        argv = service_argv(service.get("command"))
        if any("requirepass" in a for a in argv):
            c.problem(
                where,
                "passes the password on the command line (visible in ps): use its config secret",
            )
        configs = [a for a in argv[1:] if a.startswith(SECRETS_DIR)]
        if argv[:1] != ["redis-server"] or not configs:
            c.problem(
                where,
                f"does not start redis-server with its config from a secret ({SECRETS_DIR}NAME)",
            )
            continue
        secret = configs[0][len(SECRETS_DIR) :]
        mounted = {
            s if isinstance(s, str) else s.get("source") for s in service.get("secrets") or []
        }
        path = files.get(secret)
        if secret not in mounted or path is None:
            c.problem(where, f"its config {configs[0]} is not a secret it mounts")
            continue
        if not path.is_file():
            c.problem(
                c.rel(path), "missing: Redis' config with its password; run docker/make-keys.sh"
            )
            continue
        passwords = re.findall(r"^requirepass\s+(\S+)\s*$", path.read_text(), re.MULTILINE)
        if len(passwords) != 1 or len(passwords[0]) < 16:
            c.problem(c.rel(path), "must set one requirepass of 16 characters or more")
            continue
        broker = airflow_env.get("AIRFLOW__CELERY__BROKER_URL", "")
        match = re.match(r"redis://:([^@]+)@", broker)
        if not match or match.group(1) != passwords[0]:
            c.problem(
                "docker/keys/celery_broker_url", f"does not carry the password of {c.rel(path)}"
            )
        health = " ".join(service_argv((service.get("healthcheck") or {}).get("test")))
        if "REDISCLI_AUTH" not in health and " -a " not in health:
            c.problem(where, "healthcheck does not authenticate (REDISCLI_AUTH)")
        if "${AIRFLOW_UID" not in str(service.get("user", "")):
            c.problem(where, "must run as AIRFLOW_UID to read its 0600 config secret")


def _networks(service: dict) -> list[str]:
    networks = service.get("networks")
    return list(networks) if networks else []


def _check_networks(c, compose, services, airflow_services, facility_services) -> None:
    declared = compose.get("networks") or {}
    for name, service in services.items():
        where = f"docker/compose.yaml service {name}"
        if not _networks(service):
            c.problem(
                where, "names no networks: it would join the default network every service shares"
            )
        for network in _networks(service):
            if network not in declared:
                c.problem(where, f"network {network} is not declared under networks:")
    clients = {n for n, s in airflow_services.items()
               if " ".join(service_argv(s.get("command"))[1:3]) in FACILITY_CLIENTS}  # fmt: skip
    if not clients:
        c.problem("docker/compose.yaml", "no worker or triggerer to reach the facilities")
    facility_networks = set()
    for name, service in facility_services.items():
        where = f"docker/compose.yaml service {name}"
        mine = _networks(service)
        if len(mine) != 1:
            c.problem(where, f"must be on exactly one network of its own, is on {mine}")
            continue
        network = mine[0]
        facility_networks.add(network)
        if not (declared.get(network) or {}).get("internal"):
            c.problem(
                f"docker/compose.yaml network {network}",
                f"must be internal: true (facility {name})",
            )
        members = {n for n, s in services.items() if network in _networks(s)}
        strangers = sorted(members - clients - {name})
        if strangers:
            c.problem(where, f"shares network {network} with {', '.join(strangers)}: a facility reaches only "
                             "its sshd, the worker and the triggerer")  # fmt: skip
        for client in sorted(clients - members):
            c.problem(
                f"docker/compose.yaml service {client}",
                f"is not on {network}: it cannot reach {name}",
            )
    for name in CONTROL_PLANE_ONLY:
        for network in facility_networks & set(_networks(services.get(name) or {})):
            c.problem(f"docker/compose.yaml service {name}", f"is on facility network {network}")
    for name in airflow_services:
        if name in clients:
            continue
        for network in facility_networks & set(_networks(airflow_services[name])):
            c.problem(f"docker/compose.yaml service {name}", f"is on facility network {network}")


def _check_ports(c, services) -> None:
    for name, service in services.items():
        for port in service.get("ports") or []:
            text = str(port if not isinstance(port, dict) else port.get("host_ip", ""))
            if isinstance(port, dict) or not text.startswith(BIND + ":"):
                c.problem(f"docker/compose.yaml service {name}",
                          f"publishes {text!r}: bind it to {BIND} (loopback unless the user opts out)")  # fmt: skip
