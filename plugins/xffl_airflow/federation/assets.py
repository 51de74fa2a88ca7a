"""The Airflow asset of a federation's global model: one per config, an event per round.

Every round's ``finalize`` emits an event for it; a DAG scheduled on it
(``schedule=[global_model_asset(config)]``) runs once per finished round. The DAG is per
config, but its scheduled runs start campaigns of their own (``<campaign>-<date>``): the asset
is the config's, and the event's extra names the campaign and round it comes from, with the
model's folder, the sha256 of each of its files, the weighted validation loss and the
convergence decision. (An ``AssetAlias`` per campaign would not do: a DAG scheduled on an
alias only hears the assets the alias resolved to when that DAG was parsed, so a new
campaign's first events would be lost.)

    URI   xffl://<campaign><storage>/global-model    (the config's campaign and storage:
          xffl://demo/srv/xffl/global-model; the event's extra says where the files are)
    name  xffl_<campaign>_global_model
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset

SCHEME = "xffl"  # no Airflow normalizer claims it: the URI is kept as written


def global_model_asset(config: Any) -> Asset:
    """The asset of ``config``'s global model (a ``FederationConfig``)."""
    storage = str(config.storage).rstrip("/")
    return Asset(
        name=f"xffl_{config.campaign.replace('-', '_')}_global_model",
        uri=f"{SCHEME}://{config.campaign}{storage}/global-model",
        group="xffl",
        extra={"campaign": config.campaign, "storage": storage},
    )
