"""A round's plan: everything its tasks do, decided once in ``prepare``, typed and frozen.

``build_round_plan`` is pure: from the validated config (the run's knobs merged in), the
campaign, the round and the resolved input model it computes, per facility, the connection,
the login environment, the workdir, the training command and the sbatch options, and for the
round the strategy with its options, the weight cap, the quorum and the convergence rules.
``store.seal_plan`` writes it into the campaign's storage; every later task reads it from
there and obeys nothing else (no XCom, no config file).

A plan read back is validated again (``RoundPlan.from_json``): unknown fields, wrong types or a
plan of another DAG, campaign or round are refused.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xffl_airflow.federation.errors import PlanError
from xffl_airflow.federation.layout import RemoteLayout
from xffl_airflow.slurm.login import FacilityLogin

PLAN_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SealedModel(_Frozen):
    """A plan: canonical JSON (equal plans give equal bytes, hence equal hashes), compared but
    for when it was sealed, and validated again (strict) whenever it is read."""

    sealed_at: str
    #: What the plan is, in messages.
    kind: ClassVar[str] = "plan"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1) + "\n"

    def same_as(self, other: SealedModel) -> bool:
        """Equal but for when each was sealed (a retried ``prepare`` keeps the sealed one)."""
        return self.model_copy(update={"sealed_at": ""}) == other.model_copy(update={"sealed_at": ""})

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str):
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise PlanError(f"{source}: not a valid {cls.kind}: {where}: {first['msg']}") from None


class LoginPlan(_Frozen):
    preamble: tuple[str, ...] = ()
    slurm_bin: str | None = None

    @property
    def facility_login(self) -> FacilityLogin:
        """Validated again when it is made (``FacilityLogin``): what the hook and trigger take."""
        return FacilityLogin(self.preamble, self.slurm_bin)


class FacilityPlan(_Frozen):
    """What the round does at one facility."""

    name: str
    conn_id: str
    login: LoginPlan
    workdir: str
    #: The remote folders, relative to ``workdir`` (the transfer keeps them inside it).
    remote_global: str
    remote_local: str
    remote_base: str | None = None
    #: The job's working directory (absolute): batch scripts and Slurm logs.
    jobs_dir: str
    #: How the facility runs our Python: for the commands the round's later jobs (the final
    #: evaluation) need beside ``command``.
    python: str
    launcher: Literal["none", "srun", "torchrun"] = "none"
    nproc_per_node: int = 1
    data: str
    command: str
    #: ``SbatchOptions.to_dict()``, the facility's preamble included.
    sbatch: dict[str, Any]
    weight: float | None = None
    #: The most samples the facility may claim (``facilities[].max_samples``); None: no bound.
    max_samples: int | None = None
    #: The pull's budget: files and bytes at most (``facilities[].max_pull_bytes`` raises it).
    max_pull_files: int | None = None
    max_pull_bytes: int | None = None
    #: (LoRA) the facility's adapter rank and alpha, and where this round pushes the base
    #: (relative to ``workdir``; None: no base is pushed this round).
    lora_r: int | None = None
    lora_alpha: float | None = None
    base_push: str | None = None
    #: (lora-stacked) the most bytes the facility's adapter weights may hold (from the base's
    #: shapes and its rank): the pull's budget.
    adapter_bytes: int | None = None
    #: (privacy) what the facility's data may spend in all, and why it does not train this
    #: round (its next run would exceed it); None: it trains.
    epsilon_budget: float | None = None
    excluded: str | None = None


class PrivacyPlan(_Frozen):
    """DP-SGD at every facility (``privacy`` of the config): what each job must run with, and
    what its metrics.json must report (``rounds.privacy``)."""

    mode: Literal["dp-sgd"]
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float
    delta: float | None = None
    accountant: Literal["rdp", "prv"]
    withhold_validation: bool = False


class ConvergencePlan(_Frozen):
    max_rounds: int
    min_improvement: float
    patience: int
    min_update_norm: float


class WarmStart(_Frozen):
    """The finished campaign a new one starts from (round 0 of a warm-started campaign)."""

    campaign: str
    round: int
    model: str
    manifest: str
    manifest_sha256: str
    finished: bool


class PeftPlan(_Frozen):
    """A LoRA campaign: the base model stays at each facility; the rounds move adapters.
    ``base_model``: the base this round pushes (a lora-stacked round after 0: the canonical
    merged base, for the facilities that catch up)."""

    base_model: str
    base_model_sha256: dict[str, str]
    r: int
    alpha: float


class RoundPlan(SealedModel):
    """One round of one campaign, as ``prepare`` sealed it."""

    kind: ClassVar[str] = "round plan"

    version: Literal[1] = PLAN_VERSION
    dag_id: str
    campaign: str
    round: int = Field(ge=0)
    #: The federation that owns the campaign (``FederationDag.identity()``).
    federation: dict[str, str]
    config_path: str
    config_sha256: str
    #: The knobs this run changed (``{section: {name: value}}``): the next round keeps them.
    overrides: dict[str, dict[str, Any]]
    #: The training hyperparameters (the run's knobs merged in), as the jobs' flags give them.
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    storage: str
    #: The model the round starts from and the sha256 of each file pushed of it (a lora-stacked
    #: round pushes its ``stacked_update/``; its round 0 pushes only the base: empty).
    input_model: str
    input_model_sha256: dict[str, str]
    warm_start: WarmStart | None = None
    strategy: str
    strategy_options: dict[str, float]
    max_weight_share: float | None = None
    #: Update-norm bounding: a client whose update norm exceeds ``norm_bound`` times the median
    #: is clipped to it or refused (``norm_bound_action``); None: off.
    norm_bound: float | None = None
    norm_bound_action: Literal["clip", "refuse"] = "clip"
    quorum: int = Field(ge=1)
    convergence: ConvergencePlan
    peft: PeftPlan | None = None
    privacy: PrivacyPlan | None = None
    facilities: tuple[FacilityPlan, ...]
    #: What the config leaves open (``FederationConfig.warnings``), recorded in the manifest.
    warnings: tuple[str, ...] = ()
    sealed_at: str

    def facility(self, name: str) -> FacilityPlan:
        for facility in self.facilities:
            if facility.name == name:
                return facility
        raise PlanError(f"campaign {self.campaign} round {self.round}: the plan has no facility {name!r}")

    @property
    def facility_names(self) -> list[str]:
        return [f.name for f in self.facilities]



def training_command(config: Any, facility_name: str, remote: RemoteLayout, *, catch_up: bool = False) -> str:
    """The shell command that trains at ``facility_name`` (absolute remote paths, quoted).

    ``lora-stacked``: every round trains a fresh adapter of the facility's rank on its merged
    base: round 0 on the base; round k on the base that merging the pushed update into its
    round k-1 base gives (``catch_up``: a facility that did not train in round k-1 gets the
    canonical base pushed instead), its earlier merged bases removed once it trained."""
    facility = config.facility(facility_name)

    def at(relative: str) -> str:
        return f"{facility.workdir}/{relative}"

    model, out = at(remote.global_dir), at(remote.local_dir)
    hyperparameters = config.training.hyperparameters
    if config.privacy is not None:  # DP-SGD at the facility: the config author's settings
        hyperparameters = {**hyperparameters, **config.privacy.training_flags()}
    adapter, round_paths, cleanup = None, None, None
    peft = config.training.peft
    if peft is not None and config.aggregation.strategy == "lora-stacked":
        r, alpha = config.lora_rank(facility_name)
        k = remote.round_number
        hyperparameters = {**hyperparameters, "peft": "lora", "lora_r": r, "lora_alpha": alpha, "lora_dropout": peft.dropout,
                           "lora_target_modules": ",".join(peft.target_modules),
                           "seed": int(hyperparameters.get("seed", 0)) + k}  # a fresh A each round  # fmt: skip
        if k == 0:
            model = at(remote.base_dir)
        elif catch_up:
            model = at(remote.merged_base(k))
        else:
            model = at(remote.base_dir if k == 1 else remote.merged_base(k - 1))
            round_paths = {"stacked_update": at(remote.global_dir), "merged_base": at(remote.merged_base(k))}
        if k > 0:
            from xffl_airflow.training_job import stacked_base_cleanup

            cleanup = stacked_base_cleanup(at(remote.stacked_bases_dir), remote.merged_base(k).rsplit("/", 1)[1])
    elif peft is not None:  # the base model stays, the round's adapter trains
        model, adapter = at(remote.base_dir), model
        if config.aggregation.strategy == "lora-frozen-a":
            hyperparameters = {**hyperparameters, "lora_train_a": False}
    if config.training.command:
        return config.training.command.format(
            python=shlex.quote(facility.python),
            model=shlex.quote(model),
            data=shlex.quote(facility.data),
            out=shlex.quote(out),
        )
    from xffl_airflow.training_job import build_training_command

    command = build_training_command(
        python=facility.python,
        launcher=facility.launcher,
        model_dir=model,
        data_path=facility.data,
        out_dir=out,
        hyperparameters=hyperparameters,
        nproc_per_node=facility.nproc_per_node,
        adapter_dir=adapter,
        round_paths=round_paths,
    )
    return f"{command} && {cleanup}" if cleanup else command


def facility_plan(config: Any, name: str, remote: RemoteLayout, *, catch_up: bool = False,
                  adapter_bytes: int | None = None, excluded: str | None = None) -> FacilityPlan:  # fmt: skip
    facility = config.facility(name)
    login = facility.login
    stacked = config.aggregation.strategy == "lora-stacked"
    base_push = None
    if config.training.peft is not None:
        base_push = remote.base_dir  # sent in full once, then only hashed
        if stacked and remote.round_number > 0:
            base_push = remote.merged_base(remote.round_number) if catch_up else None
    r, alpha = config.lora_rank(name) if config.training.peft is not None else (None, None)
    return FacilityPlan(
        name=name,
        conn_id=facility.connection_id,
        login=LoginPlan(preamble=login.preamble, slurm_bin=login.slurm_bin),
        workdir=facility.workdir,
        remote_global=remote.global_dir,
        remote_local=remote.local_dir,
        remote_base=remote.base_dir if config.training.peft is not None else None,
        jobs_dir=f"{facility.workdir}/{remote.jobs_dir}",
        python=facility.python,
        launcher=facility.launcher,
        nproc_per_node=facility.nproc_per_node,
        data=facility.data,
        command=training_command(config, name, remote, catch_up=catch_up),
        sbatch={**facility.sbatch, "preamble": list(facility.preamble)},
        weight=facility.weight,
        max_samples=getattr(facility, "max_samples", None),
        max_pull_files=getattr(facility, "max_pull_files", None),
        max_pull_bytes=getattr(facility, "max_pull_bytes", None),
        lora_r=r,
        lora_alpha=alpha,
        base_push=base_push,
        adapter_bytes=adapter_bytes,
        epsilon_budget=config.epsilon_budget(name) if config.privacy is not None else None,
        excluded=excluded,
    )


def build_round_plan(
    config: Any,
    *,
    dag_id: str,
    federation: dict[str, str],
    config_path: str,
    config_sha256: str,
    overrides: dict[str, dict[str, Any]],
    campaign: str,
    round_number: int,
    input_model: str,
    input_model_sha256: dict[str, str],
    warm_start: dict[str, Any] | None,
    base_model_sha256: dict[str, str] | None,
    sealed_at: str,
    base_model: str | None = None,
    catch_up: frozenset[str] = frozenset(),
    adapter_bytes: dict[str, int] | None = None,
    excluded: dict[str, str] | None = None,
) -> RoundPlan:
    """The round's plan from the validated config (``FederationConfig``, the run's knobs merged
    in) and what ``prepare`` resolved. Pure."""
    remote = RemoteLayout(campaign, round_number, namespace=dag_id)
    peft = None
    if config.training.peft is not None:
        peft = PeftPlan(base_model=base_model or config.base_model, base_model_sha256=dict(base_model_sha256 or {}),
                        r=config.training.peft.r, alpha=float(config.training.peft.alpha))  # fmt: skip
    convergence = config.convergence
    return RoundPlan(
        dag_id=dag_id,
        campaign=campaign,
        round=round_number,
        federation=dict(federation),
        config_path=str(config_path),
        config_sha256=config_sha256,
        overrides={section: dict(values) for section, values in overrides.items()},
        hyperparameters=dict(config.training.hyperparameters),
        storage=str(config.storage),
        input_model=str(input_model),
        input_model_sha256=dict(input_model_sha256),
        warm_start=WarmStart(**warm_start) if warm_start else None,
        strategy=config.aggregation.strategy,
        strategy_options={k: float(v) for k, v in (config.aggregation.options or {}).items()},
        max_weight_share=config.aggregation.max_weight_share,
        norm_bound=config.aggregation.update_norm_bound.k if config.aggregation.update_norm_bound else None,
        norm_bound_action=config.aggregation.update_norm_bound.action if config.aggregation.update_norm_bound else "clip",
        quorum=config.required_facilities,
        convergence=ConvergencePlan(
            max_rounds=convergence.max_rounds, min_improvement=float(convergence.min_improvement),
            patience=convergence.patience, min_update_norm=float(convergence.min_update_norm),
        ),  # fmt: skip
        peft=peft,
        privacy=PrivacyPlan(**config.privacy.model_dump(exclude={"epsilon_budget"})) if config.privacy else None,
        facilities=tuple(facility_plan(config, f.name, remote, catch_up=f.name in catch_up,
                                       adapter_bytes=(adapter_bytes or {}).get(f.name),
                                       excluded=(excluded or {}).get(f.name)) for f in config.facilities),
        warnings=tuple(config.warnings),
        sealed_at=sealed_at,
    )
