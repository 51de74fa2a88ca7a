"""The Airflow plugin of the campaign view (AIP-68): a FastAPI app the api-server mounts under
``/xffl``, and two external views that the UI shows as a "Campaign" tab on the federation DAG's
page and on each round run's page (an iframe of the app's page, same origin, so the UI's
session cookie goes along).

Registered through the ``airflow.plugins`` entry point (pyproject.toml). Every Airflow component
loads plugins, task processes included, so importing this module stays cheap: the app (and
Airflow's API security module) is built on its first request, in the api-server only.
"""

from __future__ import annotations

import threading
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/xffl"


class LazyApp:
    """An ASGI app that builds ``xffl_airflow.ui.app.create_app()`` on its first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def _build(self) -> Any:
        with self._lock:
            if self._app is None:
                from xffl_airflow.ui.app import create_app

                self._app = create_app()
        return self._app

    async def __call__(self, scope, receive, send) -> None:
        await (self._app or self._build())(scope, receive, send)


class CampaignViewPlugin(AirflowPlugin):
    name = "xffl_campaign_view"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "xffl campaign view"}]
    external_views = [
        {
            "name": "Campaign",
            "href": URL_PREFIX + "/dags/{DAG_ID}/campaign",
            "destination": "dag",
            "url_route": "xffl-campaign",
        },
        {
            "name": "Campaign round",
            "href": URL_PREFIX + "/dags/{DAG_ID}/runs/{RUN_ID}/campaign",
            "destination": "dag_run",
            "url_route": "xffl-campaign-round",
        },
    ]
