"""The federation DAGs: one DAG per federation config, one run per round.

``XFFL_FEDERATION_CONFIG`` names the config files (one path, or several separated by ``:``);
each gives the DAG ``xffl_<campaign>``. A config that does not validate is an import error that
names the file and the field. See ``xffl_airflow.federation.dag`` for the shape of a round.
"""

from __future__ import annotations

import os

from xffl_airflow.federation.dag import build_federation_dags

build_federation_dags([p for p in os.environ.get("XFFL_FEDERATION_CONFIG", "").split(":") if p])
