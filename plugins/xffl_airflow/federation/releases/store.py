"""A campaign's release run in its storage: the sealed release plan, the steps' records, the
facilities' evaluations and the selection (docs/release.md)::

    <storage>/<campaign>/release/
        plan.json                          the sealed release plan
        steps/<facility>/push.json, evaluate.json, pull.json
        evaluations/<facility>/<n>/evaluation.json   what each facility's evaluation sent back
        failures/<facility>.json           why a facility's evaluation is missing
        selection.json                     the best round, the comparison, the decision

A release run of another campaign, or run again for this one, seals its plan anew: the steps
made under an earlier plan do not count for it (``sealing``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_airflow.federation.errors import PlanError
from xffl_airflow.federation.names import FederationDag
from xffl_airflow.federation.releases.plan import ReleasePlan
from xffl_airflow.federation.sealing import read_record, read_sealed, seal, write_record

log = logging.getLogger(__name__)
STEPS = ("push", "evaluate", "pull")


@dataclass(frozen=True)
class ReleaseLayout:
    storage: Path
    campaign: str

    @property
    def folder(self) -> Path:
        return Path(self.storage) / self.campaign / "release"

    @property
    def plan(self) -> Path:
        return self.folder / "plan.json"

    @property
    def selection(self) -> Path:
        return self.folder / "selection.json"

    def step(self, facility: str, step: str) -> Path:
        if step not in STEPS:
            raise ValueError(f"no release step {step!r}; one of {', '.join(STEPS)}")
        return self.folder / "steps" / facility / f"{step}.json"

    def evaluation(self, facility: str, index: int) -> Path:
        return self.folder / "evaluations" / facility / str(index)

    def failure(self, facility: str) -> Path:
        return self.folder / "failures" / f"{facility}.json"


@dataclass(frozen=True)
class SealedRelease:
    plan: ReleasePlan
    sha256: str
    path: Path

    @property
    def layout(self) -> ReleaseLayout:
        return ReleaseLayout(Path(self.path).parent.parent.parent, self.plan.campaign)

    def where(self) -> str:
        return f"campaign {self.plan.campaign}'s release"


def seal_release(plan: ReleasePlan, storage: Path) -> SealedRelease:
    path = ReleaseLayout(storage, plan.campaign).plan
    stands, sha = seal(plan, path, what=f"campaign {plan.campaign}'s release plan", log=log)
    return SealedRelease(stands, sha, path)


def load_release(dag: FederationDag, campaign: str) -> SealedRelease:
    """The campaign's sealed release plan in ``dag``'s storage, checked to be this federation's
    and this campaign's."""
    path = ReleaseLayout(dag.storage, campaign).plan
    if not path.is_file():
        raise PlanError(f"campaign {campaign}: no sealed release plan at {path}; prepare_release has not succeeded")
    plan, sha = read_sealed(ReleasePlan, path, what="release plan")
    if (plan.federation_dag_id, plan.campaign) != (dag.dag_id, campaign):
        raise PlanError(f"{path}: the release plan is for DAG {plan.federation_dag_id}, campaign {plan.campaign}; "
                        f"this run is {dag.dag_id}, campaign {campaign}: nothing is obeyed")  # fmt: skip
    return SealedRelease(plan, sha, path)


def write_step(sealed: SealedRelease, facility: str, step: str, result: dict[str, Any]) -> Path:
    return write_record(sealed.layout.step(facility, step), sealed.sha256, {"step": step, "facility": facility}, result)


def step_result(sealed: SealedRelease, facility: str, step: str) -> dict[str, Any] | None:
    record = read_record(sealed.layout.step(facility, step))
    return record["result"] if record is not None and record.get("plan_sha256") == sealed.sha256 else None


def require_step(sealed: SealedRelease, facility: str, step: str, *, before: str) -> dict[str, Any]:
    result = step_result(sealed, facility, step)
    if result is None:
        raise PlanError(f"{sealed.where()}: {facility} cannot {before}: its {step} has not succeeded under this plan")
    return result
