"""Where a campaign's files live, locally and at the facilities. Pure path arithmetic.

Locally (the Airflow side, a folder every worker reaches)::

    <storage>/<campaign>/round-NNNN/
        input/                  links to the input model's files: what the facilities receive
        global/                 the global model this round produced (+ aggregation.json)
        clients/<facility>/     each facility's trained model and metrics.json
        failures/<facility>.json  why a facility missed the round, when it did
        manifest.json           the round's record, chained to the previous round's
    <storage>/<campaign>/report.png, report.txt

At a facility, inside its workdir::

    <workdir>/<campaign>/round-NNNN/global/   the pushed global model
    <workdir>/<campaign>/round-NNNN/local/    the model trained there
    <workdir>/<campaign>/round-NNNN/jobs/     batch scripts and Slurm logs
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xffl_tasks.manifest import MANIFEST, round_dir_name

RUN_ID = re.compile(r"^xffl__(?P<campaign>[a-z][a-z0-9_-]{0,63})__round-(?P<round>\d{4,})$")


def run_id(campaign: str, round_number: int) -> str:
    """The DAG run id of one round: deterministic, so a retried trigger cannot fork the chain."""
    return f"xffl__{campaign}__{round_dir_name(round_number)}"


def parse_run_id(value: str) -> tuple[str, int] | None:
    match = RUN_ID.match(value)
    return (match["campaign"], int(match["round"])) if match else None


@dataclass(frozen=True)
class CampaignLayout:
    storage: Path
    campaign: str

    @property
    def campaign_dir(self) -> Path:
        return Path(self.storage) / self.campaign

    def round_dir(self, round_number: int) -> Path:
        return self.campaign_dir / round_dir_name(round_number)

    def global_model(self, round_number: int) -> Path:
        """The global model that ``round_number`` produced."""
        return self.round_dir(round_number) / "global"

    def client_dir(self, round_number: int, facility: str) -> Path:
        return self.round_dir(round_number) / "clients" / facility

    def failure_record(self, round_number: int, facility: str) -> Path:
        return self.round_dir(round_number) / "failures" / f"{facility}.json"

    def manifest(self, round_number: int) -> Path:
        return self.round_dir(round_number) / MANIFEST

    @property
    def report_png(self) -> Path:
        return self.campaign_dir / "report.png"

    @property
    def report_txt(self) -> Path:
        return self.campaign_dir / "report.txt"


@dataclass(frozen=True)
class RemoteLayout:
    """Paths at one facility, relative to its workdir (the transfer confines them there)."""

    campaign: str
    round_number: int

    @property
    def round_dir(self) -> str:
        return str(PurePosixPath(self.campaign) / round_dir_name(self.round_number))

    @property
    def global_dir(self) -> str:
        return f"{self.round_dir}/global"

    @property
    def local_dir(self) -> str:
        return f"{self.round_dir}/local"

    @property
    def jobs_dir(self) -> str:
        return f"{self.round_dir}/jobs"
