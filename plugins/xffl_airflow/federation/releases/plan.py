"""A campaign's release plan: what the release run does, decided once in ``prepare_release``.

When a campaign's convergence rule stops it, the federation's release DAG runs once for it: each
facility evaluates the campaign's last global model (and the federation's last release, when
there is one) on its validation split in a Slurm job, with the rounds' own data, seed and
metrics; the best round's model is chosen over the chain; it is released when it beats the last
release by the margin (and a person approves, when the config asks). ``ReleasePlan`` holds all
of it, sealed into ``<campaign>/release/plan.json``; every later task of the run obeys it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from xffl_airflow.federation.errors import PlanError
from xffl_airflow.federation.rounds.plan import FacilityPlan, LoginPlan, SealedModel, _Frozen

#: The candidates a facility evaluates: the campaign's last global model, the last release.
LAST, RELEASE = "last", "release"


class PreviousRelease(_Frozen):
    """The federation's newest release when the campaign ended: what the campaign must beat."""

    number: int = Field(ge=1)
    folder: str
    model: str
    release_json_sha256: str
    model_sha256: dict[str, str]


class EvaluationFacility(_Frozen):
    """What one facility does in the release run: receive the models, evaluate them, send back
    the results (folders relative to its workdir, but ``jobs_dir``)."""

    name: str
    conn_id: str
    login: LoginPlan
    workdir: str
    jobs_dir: str
    remote_last: str
    remote_release: str | None = None
    #: Where ``xffl_tasks.evaluate`` writes evaluation.json: one folder per invocation.
    remote_outputs: tuple[str, ...]
    command: str
    sbatch: dict[str, Any]
    description: str = ""


class ReleasePlan(SealedModel):
    kind: ClassVar[str] = "release plan"

    dag_id: str
    federation_dag_id: str
    federation: dict[str, str]
    federation_name: str
    campaign: str
    final_round: int = Field(ge=0)
    final_manifest: str
    final_manifest_sha256: str
    #: What the campaign's global models are: full models, LoRA adapters (on ``base_model``),
    #: or lora-stacked rounds (the merged base of each round is the model).
    model_kind: Literal["model", "lora", "stacked"]
    last_model: str
    last_model_sha256: dict[str, str]
    base_model: str | None = None
    strategy: str
    previous_release: PreviousRelease | None = None
    releases_root: str
    min_improvement: float = Field(ge=0)
    approval: bool
    approval_timeout_h: float = Field(gt=0)
    quorum: int = Field(ge=1)
    description: str = ""
    facilities: tuple[EvaluationFacility, ...]
    sealed_at: str

    def facility(self, name: str) -> EvaluationFacility:
        for facility in self.facilities:
            if facility.name == name:
                return facility
        raise PlanError(f"campaign {self.campaign}'s release plan has no facility {name!r}")

    @property
    def facility_names(self) -> list[str]:
        return [f.name for f in self.facilities]


def evaluation_command(entry: FacilityPlan, *, hyperparameters: dict[str, Any], remote_last: str,
                       remote_release: str | None, base: str | None, outputs: tuple[str, ...]) -> str:  # fmt: skip
    """The job's command: ``xffl_tasks.evaluate`` of the last global model (an adapter on
    ``base``) and of the last release (a full model), as many invocations as ``outputs``."""
    from xffl_airflow.training_job import build_evaluation_argv, launch_command

    def at(relative: str) -> str:
        return f"{entry.workdir}/{relative}"

    def run(candidates: dict[str, str], base_dir: str | None, out: str) -> str:
        argv = build_evaluation_argv(candidates=candidates, data_path=entry.data, out_dir=at(out),
                                     hyperparameters=hyperparameters, base_dir=base_dir)  # fmt: skip
        return launch_command(python=entry.python, launcher=entry.launcher, task_argv=argv,
                              nproc_per_node=entry.nproc_per_node, master_port=hyperparameters.get("master_port"))  # fmt: skip

    if base is not None and remote_release is not None:  # an adapter, then a full model
        return " && ".join([run({LAST: at(remote_last)}, at(base), outputs[0]),
                            run({RELEASE: at(remote_release)}, None, outputs[1])])  # fmt: skip
    candidates = {LAST: at(remote_last), **({RELEASE: at(remote_release)} if remote_release else {})}
    return run(candidates, at(base) if base else None, outputs[0])


def release_folders(namespace: str, campaign: str) -> dict[str, str]:
    """A campaign's release folders at a facility, relative to its workdir."""
    final = f"{namespace}/{campaign}/final"
    return {"last": f"{final}/last", "release": f"{namespace}/release/model", "jobs": f"{final}/jobs",
            "evaluation": f"{final}/evaluation", "evaluation_release": f"{final}/evaluation-release"}  # fmt: skip
