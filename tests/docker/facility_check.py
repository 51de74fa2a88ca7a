"""Checks of the facility side: the scripts the test bed and the image share, the facility
services of compose.yaml, and the Airflow connections that make-keys.sh wrote for them."""

from __future__ import annotations

import json
import re

from tests.docker.deployment_files import (
    Dockerfile,
    Findings,
    as_dict,
    shell_calls,
    shell_functions,
)

FACILITY_DOCKERFILE = "docker/facility/Dockerfile"
# What the native test bed (`up`) and the facility entrypoint must both start through lib.sh.
SHARED_FUNCTIONS = ("start_munge", "create_user", "start_facility")

FACILITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")


def check_facility_scripts(c: Findings, dockerfile: Dockerfile | None) -> None:
    scripts = c.docker / "facility"
    texts = {}
    for name in ("lib.sh", "up", "entrypoint.sh"):
        path = scripts / name
        if not path.exists():
            c.problem(f"docker/facility/{name}", "missing")
        else:
            texts[name] = path.read_text()
    if "lib.sh" in texts:
        defined = shell_functions(texts["lib.sh"])
        for function in SHARED_FUNCTIONS:
            if function not in defined:
                c.problem(
                    "docker/facility/lib.sh",
                    f"does not define {function}, which the entrypoint and up call",
                )
        for user in ("up", "entrypoint.sh"):
            if user in texts:
                missing = set(SHARED_FUNCTIONS) - shell_calls(texts[user], SHARED_FUNCTIONS)
                if missing:
                    c.problem(
                        f"docker/facility/{user}",
                        f"does not call {', '.join(sorted(missing))} of lib.sh",
                    )
        if not re.search(r"^Port \$SSH_PORT$", texts["lib.sh"], re.MULTILINE) or not re.search(
            r"^ListenAddress \$SSH_LISTEN$", texts["lib.sh"], re.MULTILINE
        ):
            c.problem(
                "docker/facility/lib.sh",
                "the sshd config no longer reads Port $SSH_PORT and ListenAddress $SSH_LISTEN",
            )
    for user in ("up", "entrypoint.sh"):
        for script in re.findall(r'"\$here/([\w.-]+)"', texts.get(user, "")):
            if not (scripts / script).exists():
                c.problem(
                    f"docker/facility/{user}",
                    f"runs docker/facility/{script}, which does not exist",
                )
            elif (
                user == "entrypoint.sh"
                and dockerfile
                and not any(t.endswith("/" + script) for t in dockerfile.copied)
            ):
                c.problem(
                    FACILITY_DOCKERFILE,
                    f"does not COPY docker/facility/{script}, which the entrypoint runs",
                )
    if dockerfile:
        if not any(s == "docker/facility/lib.sh" for s in dockerfile.copied.values()):
            c.problem(
                FACILITY_DOCKERFILE,
                "does not COPY docker/facility/lib.sh, which the entrypoint sources",
            )
        if not any("install-packages.sh" in run for run in dockerfile.runs()):
            c.problem(
                FACILITY_DOCKERFILE,
                "does not RUN docker/facility/install-packages.sh (the test bed's package list)",
            )
        if (
            dockerfile.entrypoint
            and dockerfile.copied.get(dockerfile.entrypoint[0]) != "docker/facility/entrypoint.sh"
        ):
            c.problem(FACILITY_DOCKERFILE, "ENTRYPOINT is not docker/facility/entrypoint.sh")


def _entrypoint_default(c: Findings, variable: str) -> str | None:
    path = c.docker / "facility" / "entrypoint.sh"
    if not path.exists():
        return None
    match = re.search(rf"^{variable}=\$\{{{variable}:-([^}}]*)\}}", path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def check_facilities(c, facility_services, dockerfile, airflow_env, services) -> None:
    if dockerfile is None:
        return
    connections = {
        key[len("AIRFLOW_CONN_FACILITY_") :].lower(): value
        for key, value in airflow_env.items()
        if key.startswith("AIRFLOW_CONN_FACILITY_")
    }
    if not (c.docker / "keys/airflow.env").exists():
        c.problem("docker/keys/airflow.env", "missing: run docker/make-keys.sh")
    for name, service in facility_services.items():
        where = f"docker/compose.yaml service {name}"
        env = {**dockerfile.env, **as_dict(service.get("environment"))}
        facility = env.get("FACILITY_NAME", "")
        if not FACILITY_NAME.fullmatch(facility):
            c.problem(where, f"FACILITY_NAME {facility!r} is not a facility name")
        ssh_port = env.get("SSH_PORT") or _entrypoint_default(c, "SSH_PORT")
        if ssh_port != _entrypoint_default(c, "SSH_PORT") or ssh_port != dockerfile.env.get(
            "SSH_PORT"
        ):
            c.problem(
                where,
                f"SSH_PORT {ssh_port} differs from the entrypoint's default ({_entrypoint_default(c, 'SSH_PORT')}) or the image's ({dockerfile.env.get('SSH_PORT')})",
            )
        if ssh_port not in dockerfile.expose or ssh_port not in [
            str(p) for p in service.get("expose") or []
        ]:
            c.problem(
                where,
                f"SSH port {ssh_port} is not exposed by both the service and {FACILITY_DOCKERFILE}",
            )
        if env.get("SSH_LISTEN", _entrypoint_default(c, "SSH_LISTEN")) != "0.0.0.0":
            c.problem(
                where,
                "sshd must listen on 0.0.0.0 (SSH_LISTEN) to be reached from the Airflow containers",
            )
        keys_dir = env.get("FACILITY_KEYS") or _entrypoint_default(c, "FACILITY_KEYS")
        mounts = {
            v.split(":")[1]: v.split(":")[0]
            for v in service.get("volumes") or []
            if isinstance(v, str) and ":" in v
        }
        keys_source = mounts.get(keys_dir)
        if keys_source != f"./keys/{facility}":
            c.problem(
                where,
                f"mounts {keys_source} at {keys_dir}; the facility's keys are ./keys/{facility}",
            )
        host_pub = c.docker / "keys" / facility / "ssh_host_ed25519_key.pub"
        client_pub = c.docker / "keys" / facility / "client_key.pub"
        connection = connections.pop(facility, None)
        conn_where = f"docker/keys/airflow.env AIRFLOW_CONN_FACILITY_{facility.upper()}"
        if connection is None:
            c.problem(
                conn_where, f"missing: no Airflow connection facility_{facility} for service {name}"
            )
            continue
        try:
            conn = json.loads(connection)
        except json.JSONDecodeError as error:
            c.problem(conn_where, f"is not JSON: {error}")
            continue
        extra = conn.get("extra") or {}
        hosts = {name, service.get("hostname")}
        if conn.get("host") not in hosts:
            c.problem(conn_where, f"host {conn.get('host')!r} is not the service {name}")
        if str(conn.get("port")) != ssh_port:
            c.problem(
                conn_where,
                f"port {conn.get('port')} differs from the facility's SSH_PORT {ssh_port}",
            )
        user = env.get("FACILITY_USER") or _entrypoint_default(c, "FACILITY_USER")
        if conn.get("login") != user:
            c.problem(conn_where, f"login {conn.get('login')!r} is not the facility user {user!r}")
        if extra.get("no_host_key_check") not in (False, "false", None) or not extra.get(
            "host_key"
        ):
            c.problem(
                conn_where, "does not pin the host key (host_key extra, no_host_key_check false)"
            )
        elif not host_pub.exists() or extra["host_key"] != " ".join(
            host_pub.read_text().split()[:2]
        ):
            c.problem(conn_where, f"host_key is not the key in {c.rel(host_pub)}")
        if not client_pub.exists() or _public_of(extra.get("private_key", "")) != " ".join(
            client_pub.read_text().split()[:2]
        ):
            c.problem(
                conn_where, f"private_key is not the key whose public half is {c.rel(client_pub)}"
            )
    for facility in connections:
        c.problem(
            f"docker/keys/airflow.env AIRFLOW_CONN_FACILITY_{facility.upper()}",
            "names no facility service",
        )


def _public_of(private_key: str) -> str | None:
    import asyncssh

    try:
        return " ".join(
            asyncssh.import_private_key(private_key).export_public_key().decode().split()[:2]
        )
    except (asyncssh.KeyImportError, ValueError):
        return None
