"""Asks the installed Airflow whether ``airflow`` commands and ``AIRFLOW__SECTION__KEY`` options
exist (``AIRFLOW__SECTION__KEY_CMD`` for a sensitive option, which Airflow reads from a command),
and whether the CeleryExecutor imports: in a subprocess of this Python, with the CeleryExecutor configured (so that the
``airflow celery`` commands load) and a throw-away AIRFLOW_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_AIRFLOW_PROBE = r"""
import json, sys
wanted = json.load(sys.stdin)
from airflow.configuration import conf
from airflow.cli.cli_parser import get_parser
problems = []
described = conf.configuration_description
for name in wanted["options"]:
    parts = name.split("__")
    if len(parts) != 3:
        problems.append(f"{name} is not AIRFLOW__SECTION__KEY")
        continue
    section, option = parts[1].lower(), parts[2].lower()
    if option.endswith("_cmd") and option not in described.get(section, {}).get("options", {}):
        base = option[: -len("_cmd")]
        if base not in described.get(section, {}).get("options", {}):
            problems.append(f"{name}: Airflow has no option [{section}] {base} (for its _CMD form)")
        elif (section, base) not in conf.sensitive_config_values:
            problems.append(f"{name}: [{section}] {base} is not a sensitive option: Airflow ignores its _CMD form")
        continue
    if option not in described.get(section, {}).get("options", {}):
        problems.append(f"{name}: Airflow has no option [{section}] {option}")
if wanted["celery"]:
    # what `airflow celery worker` and the scheduler load: fails when the locked celery and
    # the celery provider disagree
    try:
        import airflow.providers.celery.executors.celery_executor  # noqa: F401
    except Exception as error:
        problems.append(f"the CeleryExecutor does not import with the installed packages: {type(error).__name__}: {error}")
parser = get_parser()
for service, argv in wanted["commands"]:
    try:
        parser.parse_args(argv)
    except SystemExit:
        problems.append(f"service {service}: `airflow {' '.join(argv)}` is not a valid Airflow command")
print(json.dumps(problems))
"""


def airflow_problems(
    commands: list[tuple[str, list[str]]], options: list[str], *, celery: bool = True
) -> list[str]:
    """Asks the installed Airflow (with the CeleryExecutor configured) about commands and
    options; with ``celery``, also whether the CeleryExecutor's module imports."""
    with tempfile.TemporaryDirectory(prefix="xffl-compose-check.") as home:
        env = {
            **os.environ,
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        }
        result = subprocess.run(
            [sys.executable, "-c", _AIRFLOW_PROBE],
            input=json.dumps({"commands": commands, "options": options, "celery": celery}),
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    if result.returncode != 0:
        return [f"could not ask Airflow about commands and options:\n{result.stderr[-3000:]}"]
    return json.loads(result.stdout.strip().splitlines()[-1])
