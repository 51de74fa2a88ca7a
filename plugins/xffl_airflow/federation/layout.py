"""Where a campaign's files live, locally and at the facilities. Pure path arithmetic.

Locally (the Airflow side, a folder every worker reaches; no UI user can write it)::

    <storage>/<campaign>/campaign.json    the campaign's owner: the federation DAG that made it
    <storage>/<campaign>/round-NNNN/
        plan.json               the round's sealed plan: all that its tasks obey
        input/                  links to the input model's files: what the facilities receive
        base/                   (LoRA) links to the base model's files, pushed once per facility
        steps/<facility>/push.json, train.json, pull.json   what each step did, under which plan
        steps/aggregate.json    who was aggregated, who was left out and why
        global/                 the global model this round produced (+ aggregation.json)
        clients/<facility>/     each facility's trained model and metrics.json
        failures/<facility>.json  why a facility missed the round, when it did
        manifest.json           the round's record, chained to the previous round's
    <storage>/<campaign>/report.png, report.txt

At a facility, inside its workdir, under the federation DAG's id (two federations that share a
facility's account and workdir never share a folder there)::

    <workdir>/<dag_id>/<campaign>/base/                (LoRA) the base model, kept across rounds
    <workdir>/<dag_id>/<campaign>/stacked-base/round-NNNN/  (lora-stacked) the merged base of a round
    <workdir>/<dag_id>/<campaign>/round-NNNN/global/   the pushed global model
    <workdir>/<dag_id>/<campaign>/round-NNNN/local/    the model trained there
    <workdir>/<dag_id>/<campaign>/round-NNNN/jobs/     batch scripts and Slurm logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xffl_tasks.manifest import MANIFEST, round_dir_name

PLAN = "plan.json"
OWNER = "campaign.json"
STEPS = ("push", "train", "pull")


@dataclass(frozen=True)
class CampaignLayout:
    storage: Path
    campaign: str

    @property
    def campaign_dir(self) -> Path:
        return Path(self.storage) / self.campaign

    @property
    def owner_record(self) -> Path:
        return self.campaign_dir / OWNER

    def round_dir(self, round_number: int) -> Path:
        return self.campaign_dir / round_dir_name(round_number)

    def plan(self, round_number: int) -> Path:
        return self.round_dir(round_number) / PLAN

    def pushed_model(self, round_number: int) -> Path:
        """The links to the round's input model: the folder every facility receives."""
        return self.round_dir(round_number) / "input"

    def pushed_base(self, round_number: int) -> Path:
        """(LoRA) the links to the base model's files."""
        return self.round_dir(round_number) / "base"

    def global_model(self, round_number: int) -> Path:
        """The global model that ``round_number`` produced."""
        return self.round_dir(round_number) / "global"

    def client_dir(self, round_number: int, facility: str) -> Path:
        return self.round_dir(round_number) / "clients" / facility

    def step_record(self, round_number: int, facility: str, step: str) -> Path:
        if step not in STEPS:
            raise ValueError(f"no step {step!r}; one of {', '.join(STEPS)}")
        return self.round_dir(round_number) / "steps" / facility / f"{step}.json"

    def aggregate_record(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "steps" / "aggregate.json"

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
    #: The federation DAG's id (empty: directly in the workdir).
    namespace: str = ""

    @property
    def campaign_dir(self) -> str:
        return str(PurePosixPath(self.namespace) / self.campaign) if self.namespace else self.campaign

    @property
    def round_dir(self) -> str:
        return str(PurePosixPath(self.campaign_dir) / round_dir_name(self.round_number))

    @property
    def base_dir(self) -> str:
        """Where a LoRA campaign keeps the base model at a facility, across its rounds."""
        return f"{self.campaign_dir}/base"

    @property
    def stacked_bases_dir(self) -> str:
        """(lora-stacked) where a facility keeps its merged bases, one per round."""
        return f"{self.campaign_dir}/stacked-base"

    def merged_base(self, round_number: int) -> str:
        """(lora-stacked) the base a facility trains on in ``round_number`` (>= 1)."""
        return f"{self.stacked_bases_dir}/{round_dir_name(round_number)}"

    @property
    def global_dir(self) -> str:
        return f"{self.round_dir}/global"

    @property
    def local_dir(self) -> str:
        return f"{self.round_dir}/local"

    @property
    def jobs_dir(self) -> str:
        return f"{self.round_dir}/jobs"
