"""Where the campaign view may read: the storage of the federation configs this deployment
knows (``XFFL_FEDERATION_CONFIG``), and inside it only campaign folders of the DAG asked about.

A campaign name must match the config rule (``^[a-z][a-z0-9_-]{0,63}$``); the folder must sit
directly in the configured storage once links are resolved; and its manifests must record the
DAG the request is authorized for. Anything else is "not found", never a path outside storage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xffl_airflow.federation.names import CAMPAIGN_RE, FederationDag, parse_run_id
from xffl_airflow.federation.rounds.campaigns import campaign_owner
from xffl_tasks.manifest import MANIFEST, read_manifest, round_dirs

CONFIG_ENV = "XFFL_FEDERATION_CONFIG"
log = logging.getLogger(__name__)


class NotFound(LookupError):
    """No such DAG, campaign or round the view may show; the message says which."""


def known_dags(environ: Mapping[str, str] | None = None) -> dict[str, FederationDag]:
    """The federation DAGs of the configs named by ``XFFL_FEDERATION_CONFIG``, read now (a
    config edited since the api-server started counts); a config that does not load is logged
    and left out."""
    from xffl_airflow.federation.config import ConfigError, load_config

    environ = os.environ if environ is None else environ
    found: dict[str, FederationDag] = {}
    for path in [p for p in environ.get(CONFIG_ENV, "").split(":") if p]:
        try:
            config = load_config(path)
        except ConfigError as error:
            log.warning("campaign view: %s", error)
            continue
        dag = FederationDag.of(config, path)
        found.setdefault(dag.dag_id, dag)
    return found


def federation_dag(dag_id: str, environ: Mapping[str, str] | None = None) -> FederationDag:
    dag = known_dags(environ).get(dag_id)
    if dag is None:
        raise NotFound(f"{dag_id} is not a federation DAG of this deployment ({CONFIG_ENV})")
    return dag


def read_manifests(campaign_dir: Path) -> list[dict[str, Any]]:
    """The round manifests that parse, in round order; the others are left to the verification."""
    manifests = []
    for number, folder in round_dirs(campaign_dir):
        manifest = read_manifest(folder / MANIFEST)
        if manifest is None or manifest.get("round") != number:
            continue
        facilities = manifest.get("facilities")
        if not isinstance(facilities, dict) or not all(isinstance(f, dict) for f in facilities.values()):
            manifest["facilities"] = {}
        manifests.append(manifest)
    return manifests


def campaign_dir(dag: FederationDag, name: str) -> Path:
    """``<storage>/<name>``, checked: a valid name, a folder right in the storage, and one that
    belongs to ``dag`` (its owner record or manifests say so; the config's own campaign may have
    none yet)."""
    if not isinstance(name, str) or not CAMPAIGN_RE.fullmatch(name):
        raise NotFound(f"{name!r} is not a campaign name")
    storage = dag.storage.resolve()
    folder = (storage / name).resolve()
    if folder.parent != storage or not folder.is_dir():
        raise NotFound(f"no campaign {name} in the storage of {dag.dag_id}")
    recorded = campaign_owner(folder)
    if recorded != dag.dag_id and not (recorded is None and name == dag.campaign):
        raise NotFound(f"campaign {name} is not a campaign of {dag.dag_id}")
    return folder


def campaigns_of(dag: FederationDag) -> list[str]:
    """The DAG's campaigns in its storage, newest first."""
    storage = dag.storage
    if not storage.is_dir():
        return []
    found = []
    for entry in storage.iterdir():
        try:
            folder = campaign_dir(dag, entry.name)
        except (NotFound, OSError):
            continue
        found.append((folder.stat().st_mtime, entry.name))
    return [name for _, name in sorted(found, reverse=True)]


def default_campaign(dag: FederationDag) -> str:
    """The config's own campaign when it has a folder, else the newest of the DAG's campaigns."""
    names = campaigns_of(dag)
    if dag.campaign in names:
        return dag.campaign
    if names:
        return names[0]
    raise NotFound(f"{dag.dag_id} has no campaign in {dag.storage} yet")


def campaign_of_run(dag: FederationDag, run_id: str) -> tuple[str, int | None]:
    """(campaign, round) of one of the DAG's round runs: from the run id when it follows the
    round pattern, else from the manifest that records it."""
    parsed = parse_run_id(run_id)
    if parsed is not None:
        return parsed
    for name in campaigns_of(dag):
        for manifest in read_manifests(dag.storage / name):
            if manifest.get("run_id") == run_id:
                return name, manifest["round"]
    raise NotFound(f"run {run_id} of {dag.dag_id} is not a round of a campaign in {dag.storage}")
