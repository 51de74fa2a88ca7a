"""The campaign view's FastAPI app, mounted by the api-server under ``/xffl`` (see plugin.py).

    GET /xffl/dags/{dag_id}/campaign                   the DAG's campaign (its config's own, else the newest)
    GET /xffl/dags/{dag_id}/campaigns/{campaign}       one campaign of the DAG
    GET /xffl/dags/{dag_id}/runs/{run_id}/campaign     the campaign of one round run, that round marked

``?files=1`` also re-hashes every output file the manifests list (the models: slow for big
ones); by default the manifest chain is checked, as ``python -m xffl_tasks.verify --no-files``.

Read-only. Every route needs a user Airflow has authenticated (the UI's ``_token`` cookie or an
``Authorization: Bearer`` token) who may read the DAG's runs: Airflow's own
``requires_access_dag`` dependency decides, through whichever auth manager is configured.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse

from xffl_airflow.ui import campaigns
from xffl_airflow.ui.campaign_view import render_page
from xffl_tasks.manifest import verify_campaign

URL_PREFIX = "/xffl"
HEADERS = {
    "Cache-Control": "no-store",
    # a page of text and inline SVG: nothing to load, nothing to run; framed by the Airflow UI only
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
}


def campaign_path(dag_id: str, campaign: str) -> str:
    return f"{URL_PREFIX}/dags/{quote(dag_id, safe='')}/campaigns/{quote(campaign, safe='')}"


def _page(request: Request, dag: campaigns.FederationDag, name: str, highlight: int | None) -> HTMLResponse:
    folder = campaigns.campaign_dir(dag, name)
    files = request.query_params.get("files") in ("1", "true", "yes")
    try:
        problems = verify_campaign(folder, check_files=files)
    except OSError:
        problems = None
    page = render_page(
        dag_id=dag.dag_id,
        campaign=name,
        manifests=campaigns.read_manifests(folder),
        problems=problems,
        files_checked=files,
        highlight_round=highlight,
        campaigns=[(other, campaign_path(dag.dag_id, other)) for other in campaigns.campaigns_of(dag)],
        files_link=f"{request.url.path}?files=1",
        release_html=_release_html(dag, name, folder),
    )
    return HTMLResponse(page, headers=HEADERS)


def _release_html(dag: campaigns.FederationDag, name: str, folder) -> str:
    """The campaign's release decision and the federation's releases (when the config has a
    ``release`` section)."""
    from xffl_airflow.federation.config import ConfigError, load_config
    from xffl_airflow.ui.releases_view import federation_releases, release_block
    from xffl_tasks.manifest import read_manifest

    try:
        config = load_config(dag.config_path)
    except ConfigError:
        return ""
    if config.release is None:
        return ""
    return release_block(name, read_manifest(folder / "release" / "selection.json"),
                         federation_releases(config.releases_root, config.campaign),
                         approval=read_manifest(folder / "release" / "approval.json"))  # fmt: skip


def _not_found(error: campaigns.NotFound) -> HTMLResponse:
    from html import escape

    body = f"<!doctype html><html><body><p id='not-found'>{escape(str(error))}</p></body></html>"
    return HTMLResponse(body, status_code=404, headers=HEADERS)


def create_app() -> FastAPI:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    # the dag_id path parameter names the DAG whose runs the user must be allowed to read
    may_read_runs = [Depends(requires_access_dag("GET", DagAccessEntity.RUN))]
    app = FastAPI(title="xffl campaign view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/dags/{dag_id}/campaign", dependencies=may_read_runs, response_class=HTMLResponse)
    def dag_campaign(dag_id: str, request: Request) -> HTMLResponse:
        try:
            dag = campaigns.federation_dag(dag_id)
            return _page(request, dag, campaigns.default_campaign(dag), None)
        except campaigns.NotFound as error:
            return _not_found(error)

    @app.get("/dags/{dag_id}/campaigns/{campaign}", dependencies=may_read_runs, response_class=HTMLResponse)
    def one_campaign(dag_id: str, campaign: str, request: Request) -> HTMLResponse:
        try:
            return _page(request, campaigns.federation_dag(dag_id), campaign, None)
        except campaigns.NotFound as error:
            return _not_found(error)

    @app.get("/dags/{dag_id}/runs/{run_id}/campaign", dependencies=may_read_runs, response_class=HTMLResponse)
    def run_campaign(dag_id: str, run_id: str, request: Request) -> HTMLResponse:
        try:
            dag = campaigns.federation_dag(dag_id)
            name, round_number = campaigns.campaign_of_run(dag, run_id)
            return _page(request, dag, name, round_number)
        except campaigns.NotFound as error:
            return _not_found(error)

    return app
