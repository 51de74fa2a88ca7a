"""The compose consistency checker: does ``docker/`` agree with the repository and the native
set-up that the tests run?

``check_deployment(docker_dir)`` reads ``compose.yaml``, the Dockerfiles, the facility scripts,
the files ``make-keys.sh`` wrote under ``keys/``, ``config/federation.yaml`` and the shared
Airflow settings ``config/airflow.env`` (which the native test bed applies too) in one folder,
and the Makefile beside it, and returns every disagreement as a sentence that names the file
and the thing (an empty list when all agree). It works on any copy of the folder, so a test can
break a copy and watch the checker name what broke. With ``airflow=True`` it also asks the
installed Airflow whether every ``airflow`` command is valid and every ``AIRFLOW__SECTION__KEY``
is a real option (in a subprocess, with the CeleryExecutor configured).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.docker.airflow_probe import airflow_problems
from tests.docker.deployment_files import (
    Dockerfile,
    Findings,
    as_dict,
    makefile_locks,
    parse_dockerfile,
    pip_installs,
    read_env_file,
    service_argv,
)
from tests.docker.facility_check import (
    FACILITY_DOCKERFILE,
    check_facilities,
    check_facility_scripts,
)
from tests.docker.federation_check import check_federation
from tests.docker.hardening_check import check_hardening, secret_values
from xffl_testbed.airflow_settings import SettingsError, load_settings

AIRFLOW_DOCKERFILE = "docker/airflow/Dockerfile"
SHARED_SETTINGS = "config/airflow.env"


def check_deployment(docker_dir: str | Path, *, airflow: bool = True) -> list[str]:
    """Every disagreement between ``docker_dir`` (compose file, Dockerfiles, scripts, generated
    keys, federation config) and the repository around it; ``[]`` when everything agrees."""
    c = Findings(Path(docker_dir).absolute())
    compose_path = c.docker / "compose.yaml"
    if not compose_path.exists():
        return [f"docker/compose.yaml: missing in {c.docker}"]
    compose = yaml.safe_load(compose_path.read_text())
    services: dict = compose.get("services") or {}
    named_volumes = set((compose.get("volumes") or {}).keys())

    dockerfiles: dict[str, Dockerfile] = {}
    for name, service in services.items():
        where = f"docker/compose.yaml service {name}"
        build = service.get("build")
        if build:
            context = (c.docker / build.get("context", ".")).resolve()
            if not context.is_dir():
                c.problem(where, f"build context {build.get('context')} does not exist")
                continue
            dockerfile_path = context / build.get("dockerfile", "Dockerfile")
            rel = c.rel(dockerfile_path)
            if not dockerfile_path.exists():
                c.problem(where, f"Dockerfile {rel} does not exist")
            elif rel not in dockerfiles:
                dockerfiles[rel] = parse_dockerfile(dockerfile_path.read_text(), rel)
                _check_dockerfile(c, dockerfiles[rel], context)
        for entry in service.get("env_file") or []:
            path = entry["path"] if isinstance(entry, dict) else entry
            if not (c.docker / path).exists():
                c.problem(
                    where,
                    f"env file docker/{path} does not exist (docker/make-keys.sh writes keys/)",
                )
        for volume in service.get("volumes") or []:
            source = (
                volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            )
            if source.startswith((".", "/")):
                if not (c.docker / source).exists():
                    c.problem(where, f"bind mount source {c.rel(c.docker / source)} does not exist")
            elif source not in named_volumes:
                c.problem(where, f"volume {source} is not declared under volumes:")
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                c.problem(where, f"depends_on names no service: {dependency}")

    airflow_services = {
        n: s
        for n, s in services.items()
        if (s.get("build") or {}).get("dockerfile") == AIRFLOW_DOCKERFILE
    }
    facility_services = {
        n: s
        for n, s in services.items()
        if (s.get("build") or {}).get("dockerfile") == FACILITY_DOCKERFILE
    }
    if not airflow_services:
        c.problem("docker/compose.yaml", f"no service is built from {AIRFLOW_DOCKERFILE}")
    if not facility_services:
        c.problem("docker/compose.yaml", f"no service is built from {FACILITY_DOCKERFILE}")

    _check_locks(c, dockerfiles)
    check_facility_scripts(c, dockerfiles.get(FACILITY_DOCKERFILE))
    env_files = {}
    named = {
        entry if isinstance(entry, str) else entry["path"]
        for service in services.values()
        for entry in service.get("env_file") or []
    }
    for path in sorted(named | {"keys/airflow.env"}):
        if (c.docker / path).exists():
            env_files[path] = read_env_file(c.docker / path)
    airflow_env: dict[str, str] = {}
    sources: dict[str, str] = {}  # option -> the file that sets it
    for service in airflow_services.values():
        for entry in service.get("env_file") or []:
            path = entry if isinstance(entry, str) else entry["path"]
            for key, value in env_files.get(path, {}).items():
                airflow_env[key], sources[key] = value, f"docker/{path}"
        for key, value in as_dict(service.get("environment")).items():
            airflow_env[key], sources[key] = value, "docker/compose.yaml"
    # AIRFLOW__X_CMD: cat /run/secrets/NAME -> AIRFLOW__X, as the services will read it
    for key, (value, path) in secret_values(c, compose, airflow_services).items():
        airflow_env[key], sources[key] = value, path
    _check_shared_settings(c, airflow_services, airflow_env)
    shared = {}
    if (c.docker / SHARED_SETTINGS).exists():
        try:
            groups = load_settings(c.docker / SHARED_SETTINGS).values()
            shared = {k: v for group in groups for k, v in group.items()}
        except SettingsError:
            pass  # reported by _check_shared_settings
    check_hardening(c, compose, airflow_services, facility_services, airflow_env, shared)
    check_facilities(
        c, facility_services, dockerfiles.get(FACILITY_DOCKERFILE), airflow_env, services
    )
    _check_airflow_services(
        c, airflow_services, services, dockerfiles.get(AIRFLOW_DOCKERFILE), airflow_env,
        _postgres_login(c, compose, services),
    )  # fmt: skip
    check_federation(
        c, airflow_services, facility_services, airflow_env, dockerfiles.get(FACILITY_DOCKERFILE)
    )

    if airflow:
        commands = []
        for name, service in services.items():
            for argv in (
                service_argv(service.get("command")),
                service_argv((service.get("healthcheck") or {}).get("test")),
            ):
                argv = argv[1:] if argv[:1] in (["CMD"], ["CMD-SHELL"]) else argv
                if argv[:1] == ["airflow"]:
                    commands.append((name, argv[1:]))
        options = sorted(k for k in airflow_env if k.startswith("AIRFLOW__"))
        celery = airflow_env.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor"
        for problem in airflow_problems(commands, options, celery=celery):
            option = problem.split(":", 1)[0].split(" ", 1)[0]
            if problem.startswith("the CeleryExecutor"):
                c.problem("requirements.lock", problem)
            else:
                c.problem(sources.get(option, "docker/compose.yaml"), problem)
    return c.problems


def _check_shared_settings(c: Findings, airflow_services: dict, airflow_env: dict) -> None:
    """``config/airflow.env`` is the one source of the settings every Airflow component shares:
    it loads with the test bed's own reader, every Airflow service reads it, nothing else sets
    its options again, and its Celery and heartbeat values keep a killed worker's task safe."""
    path = c.docker / SHARED_SETTINGS
    where = f"docker/{SHARED_SETTINGS}"
    try:
        groups = load_settings(path)
    except SettingsError as error:
        c.problem(where, str(error).replace(f"{path}", "").lstrip(": "))
        return
    for name, service in airflow_services.items():
        files = [e if isinstance(e, str) else e["path"] for e in service.get("env_file") or []]
        if SHARED_SETTINGS not in files:
            c.problem(
                f"docker/compose.yaml service {name}",
                f"does not read the shared settings {where} (env_file)",
            )
        elif files[0] != SHARED_SETTINGS:
            c.problem(
                f"docker/compose.yaml service {name}",
                f"reads {where} after {files[0]}: list the shared settings first",
            )
        environment = as_dict(service.get("environment"))
        for group in groups.values():
            for key in group:
                if key in environment:
                    c.problem(
                        f"docker/compose.yaml service {name}",
                        f"sets {key} again, which {where} sets (change it there: one source)",
                    )
    shared = {k: v for group in groups.values() for k, v in group.items()}
    for key, value in shared.items():
        if airflow_env.get(key) != value:
            c.problem(
                where, f"{key} is {value!r} here but {airflow_env.get(key)!r} in the services"
            )

    def number(key: str) -> float | None:
        try:
            return float(shared[key])
        except (KeyError, ValueError):
            c.problem(where, f"{key} must be set to a number")
            return None

    timeout = number("AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT")
    interval = number("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL")
    visibility = number("AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT")
    if timeout is not None and interval is not None and not 10 * interval <= timeout <= 120:
        c.problem(
            where,
            f"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT {timeout:g} s: keep it between "
            f"10 heartbeats ({10 * interval:g} s) and 120 s, so a dead worker's task is retried soon",
        )
    if visibility is not None and visibility < 3600:
        c.problem(
            where,
            f"AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT {visibility:g} s: "
            "under an hour, a long push or pull would be delivered to a second worker",
        )
    if shared.get("AIRFLOW__CELERY__TASK_ACKS_LATE", "").lower() != "true":
        c.problem(
            where,
            "AIRFLOW__CELERY__TASK_ACKS_LATE must be True: a killed worker's message is not lost",
        )


def _check_dockerfile(c: Findings, dockerfile: Dockerfile, context: Path) -> None:
    ignore = context / (dockerfile.path + ".dockerignore")
    allowed = None
    if ignore.exists():
        lines = [
            l.strip()
            for l in ignore.read_text().splitlines()
            if l.strip() and not l.startswith("#")
        ]
        if "*" in lines:
            allowed = [l[1:].rstrip("/") for l in lines if l.startswith("!")]
    for source in dockerfile.copied.values():
        if not (context / source).exists():
            c.problem(dockerfile.path, f"COPY source {source} does not exist")
        elif allowed is not None and not any(
            source.rstrip("/") == a or source.startswith(a + "/") for a in allowed
        ):
            c.problem(dockerfile.path, f"COPY source {source} is excluded by {c.rel(ignore)}")
    for run in dockerfile.runs():
        for script in re.findall(r"(/opt/\S+\.sh)\b", run):
            if script not in dockerfile.copied:
                c.problem(dockerfile.path, f"RUN calls {script}, which no COPY puts there")
    if dockerfile.entrypoint and dockerfile.entrypoint[0] not in dockerfile.copied:
        c.problem(
            dockerfile.path, f"ENTRYPOINT {dockerfile.entrypoint[0]} is not copied into the image"
        )


def _check_locks(c: Findings, dockerfiles: dict[str, Dockerfile]) -> None:
    makefile = c.repo / "Makefile"
    if not makefile.exists():
        c.problem("Makefile", "missing: cannot compare the lock files")
        return
    locks = makefile_locks(makefile.read_text())
    for path, var in ((AIRFLOW_DOCKERFILE, "VENV"), (FACILITY_DOCKERFILE, "FACILITY_VENV")):
        dockerfile = dockerfiles.get(path)
        if dockerfile is None or var not in locks:
            c.problem(
                path,
                f"cannot compare with the Makefile's $({var}) install (one of them is missing)",
            )
            continue
        installs = pip_installs(dockerfile)
        lock_installs = [i for i in installs if "-r " in i]
        if not any(f"-r {locks[var]}" in i for i in lock_installs):
            c.problem(
                path,
                f"does not pip install -r {locks[var]} as the Makefile's $({var}) does (found {lock_installs})",
            )
        if not any(locks[var] == source for source in dockerfile.copied.values()):
            c.problem(path, f"does not COPY {locks[var]}")
        package = [i for i in installs if "-r " not in i]
        if not package or not all("--no-deps" in i for i in package):
            c.problem(
                path,
                f"installs the package without --no-deps (the Makefile installs it after {locks[var]}, --no-deps)",
            )


def _postgres_login(c: Findings, compose: dict, services: dict) -> dict[str, str] | None:
    """The PostgreSQL service's user, database and password (from its secret file), or None."""
    for service in services.values():
        if not str(service.get("image", "")).startswith("postgres"):
            continue
        env = as_dict(service.get("environment"))
        secret = env.get("POSTGRES_PASSWORD_FILE", "").removeprefix("/run/secrets/")
        spec = (compose.get("secrets") or {}).get(secret) or {}
        path = c.docker / spec["file"] if isinstance(spec, dict) and spec.get("file") else None
        if path is None or not path.is_file():
            return None
        return {"POSTGRES_USER": env.get("POSTGRES_USER", "postgres"),
                "POSTGRES_PASSWORD": path.read_text(), "POSTGRES_DB": env.get("POSTGRES_DB", "")}  # fmt: skip
    return None


def _check_airflow_services(
    c, airflow_services, services, dockerfile, airflow_env, postgres
) -> None:
    from xffl_testbed.airflow_instance import LATENCY_SETTINGS

    for key, value in LATENCY_SETTINGS.items():
        if airflow_env.get(key) != value:
            c.problem(
                "docker/compose.yaml",
                f"{key} is {airflow_env.get(key)!r}, the test bed's LATENCY_SETTINGS say {value!r}",
            )
    commands = {n: service_argv(s.get("command")) for n, s in airflow_services.items()}
    wanted = {
        ("db", "migrate"),
        ("api-server",),
        ("scheduler",),
        ("dag-processor",),
        ("triggerer",),
        ("celery", "worker"),
    }
    for command in wanted:
        if not any(tuple(argv[1 : 1 + len(command)]) == command for argv in commands.values()):
            c.problem(
                "docker/compose.yaml", f"no Airflow service runs `airflow {' '.join(command)}`"
            )
    api = [(n, argv) for n, argv in commands.items() if argv[1:2] == ["api-server"]]
    if api:
        name, argv = api[0]
        port = argv[argv.index("--port") + 1] if "--port" in argv else "8080"
        where = f"docker/compose.yaml service {name}"
        if airflow_env.get("AIRFLOW__API__PORT", port) != port:
            c.problem(
                where,
                f"AIRFLOW__API__PORT {airflow_env.get('AIRFLOW__API__PORT')} differs from --port {port}",
            )
        url = urlsplit(airflow_env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
        if url.hostname != name or str(url.port) != port or url.path != "/execution/":
            c.problem(
                where,
                f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL does not point at http://{name}:{port}/execution/",
            )
        if not any(str(p).split(":")[-1] == port for p in services[name].get("ports") or []):
            c.problem(where, f"does not publish its port {port}")
        health = " ".join(service_argv((services[name].get("healthcheck") or {}).get("test")))
        if f":{port}/" not in health:
            c.problem(where, f"healthcheck does not ask port {port}")
        if dockerfile and port not in dockerfile.expose:
            c.problem(AIRFLOW_DOCKERFILE, f"does not EXPOSE the api-server port {port}")
    if airflow_env.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
        c.problem("docker/compose.yaml", "AIRFLOW__CORE__EXECUTOR is not CeleryExecutor")
    broker = urlsplit(airflow_env.get("AIRFLOW__CELERY__BROKER_URL", ""))
    if broker.hostname not in services or str(broker.port) not in [
        str(p) for p in services.get(broker.hostname, {}).get("expose") or []
    ]:
        c.problem(
            "docker/compose.yaml",
            f"AIRFLOW__CELERY__BROKER_URL names no service exposing {broker.hostname}:{broker.port}",
        )
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        url = urlsplit(airflow_env.get(key, ""))
        if (
            not url.scheme.endswith(("postgresql+psycopg2", "postgresql"))
            or url.hostname not in services
            or url.port != 5432
        ):
            c.problem(
                "docker/keys/sql_alchemy_conn, celery_result_backend",
                f"{key} does not point at the PostgreSQL service on port 5432",
            )
        elif postgres and (url.username, url.password, url.path.lstrip("/")) != (
            postgres.get("POSTGRES_USER"),
            postgres.get("POSTGRES_PASSWORD"),
            postgres.get("POSTGRES_DB"),
        ):
            c.problem(
                "docker/keys/sql_alchemy_conn, celery_result_backend",
                f"{key} disagrees with the PostgreSQL service (user, database, the password in "
                "docker/keys/postgres_password)",
            )
