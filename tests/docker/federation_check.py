"""Checks of docker/config/federation.yaml against the compose services that run it: field
names, facility names and connection ids, and every path on a volume of the right service."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.docker.deployment_files import as_dict, mount_for
from tests.docker.facility_check import FACILITY_NAME

CAMPAIGN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
FEDERATION_KEYS = (
    "campaign",
    "storage",
    "base_model",
    "facilities",
    "training",
    "aggregation",
    "convergence",
    "quorum",
)
FACILITY_KEYS = ("name", "workdir", "data", "python", "sbatch")


def check_federation(
    c, airflow_services, facility_services, airflow_env, facility_dockerfile
) -> None:
    config_path = airflow_env.get("XFFL_FEDERATION_CONFIG")
    where = "docker/compose.yaml"
    if not config_path:
        c.problem(where, "XFFL_FEDERATION_CONFIG is not set for the Airflow services")
        return
    mounts = {name: mount_for(service, config_path) for name, service in airflow_services.items()}
    for name, mount in mounts.items():
        if mount is None or not mount[0].startswith("."):
            c.problem(
                f"{where} service {name}",
                f"does not bind-mount the federation config {config_path}",
            )
            return
    source, target = next(iter(mounts.values()))
    local = c.docker / source / Path(config_path).relative_to(target)
    where = c.rel(local)
    if not local.exists():
        c.problem(where, "missing (XFFL_FEDERATION_CONFIG names it)")
        return
    config = yaml.safe_load(local.read_text()) or {}
    for key in FEDERATION_KEYS:
        if key not in config:
            c.problem(where, f"missing field {key}")
    if not CAMPAIGN_NAME.fullmatch(str(config.get("campaign", ""))):
        c.problem(
            where, f"campaign {config.get('campaign')!r} does not match {CAMPAIGN_NAME.pattern}"
        )
    for field_name in ("storage", "base_model"):
        for name, service in airflow_services.items():
            if config.get(field_name) and mount_for(service, config[field_name]) is None:
                c.problem(
                    where, f"{field_name} {config[field_name]} is on no volume of service {name}"
                )
    services_by_facility = {
        as_dict(s.get("environment")).get("FACILITY_NAME"): s for s in facility_services.values()
    }
    seen = []
    venv_python = None
    if facility_dockerfile:
        venvs = re.findall(r"python3 -m venv (\S+)", " ".join(facility_dockerfile.runs()))
        venv_python = f"{venvs[0]}/bin/python" if venvs else None
    for index, facility in enumerate(config.get("facilities") or []):
        field_where = f"{where} facilities[{index}]"
        for key in FACILITY_KEYS:
            if key not in facility:
                c.problem(field_where, f"missing field {key}")
        name = str(facility.get("name", ""))
        seen.append(name)
        if not FACILITY_NAME.fullmatch(name):
            c.problem(field_where, f"name {name!r} does not match {FACILITY_NAME.pattern}")
        conn_id = facility.get("conn_id", f"facility_{name}")
        if conn_id != f"facility_{name}":
            c.problem(
                field_where,
                f"conn_id {conn_id} is not facility_{name}, the connection make-keys.sh writes",
            )
        if f"AIRFLOW_CONN_{conn_id.upper()}" not in airflow_env:
            c.problem(
                field_where,
                f"conn_id {conn_id}: no AIRFLOW_CONN_{conn_id.upper()} for the Airflow services",
            )
        service = services_by_facility.get(name)
        if service is None:
            c.problem(field_where, f"name {name}: no facility service with FACILITY_NAME {name}")
            continue
        home = (
            as_dict(service.get("environment")).get("FACILITY_HOME")
            or f"/home/{(facility_dockerfile.env if facility_dockerfile else {}).get('FACILITY_USER', 'xffl')}"
        )
        if not str(facility.get("workdir", "")).startswith(home.rstrip("/") + "/"):
            c.problem(
                field_where,
                f"workdir {facility.get('workdir')} is not inside the facility user's home {home}",
            )
        for key in ("workdir", "data"):
            if facility.get(key) and mount_for(service, facility[key]) is None:
                c.problem(
                    field_where, f"{key} {facility[key]} is on no volume of its facility service"
                )
        if venv_python and facility.get("python") != venv_python:
            c.problem(
                field_where,
                f"python {facility.get('python')} is not the facility image's {venv_python}",
            )
    if sorted(seen) != sorted(services_by_facility):
        c.problem(
            where,
            f"facilities {sorted(seen)} differ from the compose facility services {sorted(services_by_facility)}",
        )
    quorum = config.get("quorum")
    if not isinstance(quorum, int) or not 1 <= quorum <= len(seen):
        c.problem(where, f"quorum {quorum!r} is not between 1 and the {len(seen)} facilities")
