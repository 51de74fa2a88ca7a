"""One facility of a federation config: how to reach it, where its private data is, how a job
runs there. Validated on load; every path and line reaches remote shells (docs/security.md, R6).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from xffl_airflow.federation.config_sections import FacilityPeft

NAME = r"^[a-z][a-z0-9_]{0,15}$"
CONN_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}$"
# A facility path reaches remote shells (quoted) and SFTP requests: letters, digits and a few
# punctuation characters only, so that no quoting, line splitting or expansion can change it.
REMOTE_PATH = r"^/[A-Za-z0-9_./+@%,:=-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FacilityConfig(_Strict):
    """One facility: how to reach it, where its private data is, how to run a job there."""

    name: str
    conn_id: str | None = None
    workdir: str
    data: str
    python: str = "python3"
    launcher: Literal["none", "srun", "torchrun"] = "none"
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    preamble: list[str] = Field(default_factory=list)
    #: Shell lines run on the login node before every Slurm command (``module load slurm``,
    #: exports): the facility's login environment. The config author's, like ``preamble``.
    login_preamble: list[str] = Field(default_factory=list)
    #: The folder of the Slurm commands at this facility, when they are not on the login PATH.
    slurm_bin: str | None = None
    sbatch: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: The facility's own LoRA rank (and alpha; default: training.peft's), ``lora-stacked`` only.
    peft: FacilityPeft | None = None
    #: (privacy) what this facility's data may spend in all (``privacy.epsilon_budget`` by default).
    epsilon_budget: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)
    #: What the facility's data is (shown in a release's model card): never the data itself.
    description: str = Field(default="", max_length=500)
    #: The most training samples this facility may claim in a round (``num_samples`` of its
    #: metrics.json): a claim above it is refused and the facility left out (docs/security.md, R5).
    max_samples: int | None = Field(default=None, ge=1, le=10**12)
    #: The pull's budget for this facility: at most this many bytes and files written on the
    #: worker per round (default: what the pushed layout announces, with a margin).
    max_pull_bytes: int | None = Field(default=None, ge=1)
    max_pull_files: int | None = Field(default=None, ge=1, le=100_000)
    _login: Any = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME, value):
            raise ValueError(f"a facility name is 1-16 of a-z, 0-9 and _, starting with a letter; got {value!r}")
        return value

    @field_validator("conn_id")
    @classmethod
    def _conn_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(CONN_ID, value):
            raise ValueError(f"not a valid Airflow connection id: {value!r}")
        return value

    @field_validator("workdir", "data")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the facility, got {value!r}")
        if not re.fullmatch(REMOTE_PATH, value):
            odd = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_./+@%,:=-]", c)})
            raise ValueError(
                f"holds {', '.join(map(repr, odd))}: a facility path is letters, digits and _ . / + @ % , : = - "
                "only (it reaches remote shells and SFTP; see docs/security.md, R6)"
            )
        if ".." in Path(value).parts:
            raise ValueError(f"must not contain '..', got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", value):
            raise ValueError(f"must be a plain command or path (letters, digits, _ . / + -), got {value!r}")
        return value

    @field_validator("preamble", "login_preamble")
    @classmethod
    def _preamble(cls, lines: list[str]) -> list[str]:
        from xffl_airflow.slurm.validation import check_shell_line

        for index, line in enumerate(lines):
            try:
                check_shell_line(line, f"[{index}]")
            except ValueError as error:
                raise ValueError(str(error)) from None
        return lines

    @field_validator("slurm_bin")
    @classmethod
    def _slurm_bin(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(REMOTE_PATH, value) or ".." in Path(value).parts):
            raise ValueError(f"must be an absolute folder of letters, digits and _ . / + @ % , : = - only, got {value[:80]!r}")
        return value

    @model_validator(mode="after")
    def _sbatch(self) -> FacilityConfig:
        from xffl_airflow.slurm.options import SbatchOptions

        try:
            SbatchOptions.from_dict({**self.sbatch, "preamble": self.preamble}, field_prefix="sbatch")
        except ValueError as error:
            raise ValueError(str(error)) from None
        return self

    def model_post_init(self, context: Any) -> None:
        from xffl_airflow.slurm.login import FacilityLogin

        # validated once, here; the round's plan, the operator, the trigger and the hook take it whole
        self._login = FacilityLogin.of(self.login_preamble, self.slurm_bin)

    @property
    def login(self):
        """The facility's login environment (``xffl_airflow.slurm.login.FacilityLogin``)."""
        return self._login

    @property
    def connection_id(self) -> str:
        return self.conn_id or f"facility_{self.name}"
