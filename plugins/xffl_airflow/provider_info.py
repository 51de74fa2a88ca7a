"""Provider registration: the ``apache_airflow_provider`` entry point of pyproject.toml names
``get_provider_info``, so ``airflow providers list`` shows xffl-airflow with its hooks,
operators, triggers and sensors.

The campaign view plugin is registered once, through the ``airflow.plugins`` entry point, and
is not repeated under ``plugins`` here: with ``[core] lazy_discover_providers = False`` Airflow
loads providers' plugins as well, and a plugin named twice is reported as a plugin import error.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

PACKAGE = "xffl-airflow"
INTEGRATION = "Slurm (federated training across HPC centres)"


def _version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "0.0.0"


def get_provider_info() -> dict[str, Any]:
    def modules(*names: str) -> list[dict[str, Any]]:
        return [{"integration-name": INTEGRATION, "python-modules": list(names)}]

    return {
        "package-name": PACKAGE,
        "name": "xffl-airflow",
        "description": "Cross-facility federated fine-tuning across HPC centres: Slurm over SSH "
        "(hook, deferrable operator, trigger, sensor), model transfers and the federation DAG.",
        "versions": [_version()],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["software"]}],
        "hooks": modules("xffl_airflow.hooks.slurm"),
        "operators": modules("xffl_airflow.operators.slurm"),
        "triggers": modules("xffl_airflow.triggers.slurm"),
        "sensors": modules("xffl_airflow.sensors.slurm"),
    }
