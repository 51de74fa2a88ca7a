"""How a federation names things, in one place: its DAG, its campaigns, its round runs.

- A config's DAG is ``xffl_<campaign>`` (``-`` written ``_``): ``dag_id_for``.
- A config's campaigns: its own (the config's ``campaign``) and its scheduled ones
  (``<campaign>-<date>``), the config's namespace (``in_namespace``); a run may also name a
  campaign of its own choosing under the same rule (``check_campaign``).
- A round's run is ``xffl__<campaign>__round-NNNN`` (``run_id``): deterministic, so a retried
  trigger cannot fork the chain.
- ``FederationDag``: what a DAG build fixes from its config (DAG id, campaign, storage, config
  file), the identity every task of a round, the campaign view and the Asset consumers check.

Pure: no I/O, no Airflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import RunConfError
from xffl_tasks.manifest import round_dir_name

#: A campaign's name: the config's ``campaign`` field and the run parameter alike. It becomes a
#: folder under ``storage`` and at each facility, so nothing but these characters.
CAMPAIGN = r"^[a-z][a-z0-9_-]{0,63}$"
CAMPAIGN_RE = re.compile(CAMPAIGN)
RUN_ID_RE = re.compile(r"^xffl__(?P<campaign>[a-z][a-z0-9_-]{0,63})__round-(?P<round>\d{4,})$")
MAX_ROUND = 1_000_000


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def dag_id_for(campaign: str) -> str:
    """The federation DAG's id for a config's campaign."""
    return f"xffl_{campaign.replace('-', '_')}"


def release_dag_id(campaign: str) -> str:
    """The config's release DAG: ``xffl_<campaign>.release`` (no config's DAG id holds a dot)."""
    return f"{dag_id_for(campaign)}.release"


def release_run_id(campaign: str) -> str:
    """The release run of one campaign (a retried trigger cannot start a second one)."""
    return f"xffl_release__{campaign}"


def run_id(campaign: str, round_number: int) -> str:
    """The DAG run id of one round: deterministic, so a retried trigger cannot fork the chain."""
    return f"xffl__{campaign}__{round_dir_name(round_number)}"


def parse_run_id(value: str) -> tuple[str, int] | None:
    match = RUN_ID_RE.match(value)
    return (match["campaign"], int(match["round"])) if match else None


def check_campaign(value: Any, where: str) -> str:
    """A campaign name as the config and the run parameter must give it."""
    if not isinstance(value, str) or not CAMPAIGN_RE.fullmatch(value):
        raise RunConfError(
            f"{where}: a campaign name is 1-64 of a-z, 0-9, _ and -, starting with a letter; got {_shown(value)}"
        )
    return value


def check_round(value: Any, where: str = "params.round") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise RunConfError(f"{where}: must be a whole number from 0 to {MAX_ROUND}, got {_shown(value)}")
    return value


def in_namespace(name: str, prefix: str) -> bool:
    """Whether campaign ``name`` is the config's own (``prefix``) or one of its scheduled ones."""
    return name == prefix or name.startswith(prefix + "-")


def scheduled_campaign(prefix: str, logical_date: Any) -> str:
    """The campaign a scheduled run of the config starts: ``<prefix>-<YYYYmmddtHHMM>``."""
    stamp = logical_date.strftime("%Y%m%dt%H%M") if hasattr(logical_date, "strftime") else str(logical_date)
    return f"{prefix}-{stamp}"[:64]


def campaign_for_run(prefix: str, *, requested: Any, run_type: str, logical_date: Any) -> str:
    """The campaign of a run: the one it names (checked), else a scheduled run's own, else the
    config's. A name such as ``../x`` or ``/etc`` is refused (docs/security.md, R2)."""
    if requested:
        return check_campaign(requested, "params.campaign")
    if run_type == "scheduled" and logical_date is not None:
        return scheduled_campaign(prefix, logical_date)
    return prefix


@dataclass(frozen=True)
class FederationDag:
    """A federation DAG as its build fixed it: id, the config's campaign, storage, config file."""

    dag_id: str
    campaign: str
    storage: Path
    config_path: str

    @classmethod
    def of(cls, config: Any, config_path: str | Path) -> FederationDag:
        """The DAG of a ``FederationConfig`` read from ``config_path``."""
        return cls(dag_id_for(config.campaign), config.campaign, Path(config.storage), str(config_path))

    def identity(self) -> dict[str, str]:
        """What a campaign's owner record and manifests say about the federation that owns it."""
        return {"dag_id": self.dag_id, "campaign": self.campaign, "storage": str(self.storage),
                "config_path": self.config_path}  # fmt: skip
