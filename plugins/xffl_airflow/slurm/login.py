"""A facility's login environment: what its login shell needs before any Slurm command.

``FacilityLogin`` is validated once, when it is made (the federation config builds it when the
config is parsed), and then passed whole to the operator, the sensor, the trigger and the hook.
A trigger's state must be JSON-safe: it carries ``login.to_dict()`` and rebuilds the value with
``FacilityLogin.from_dict``, which validates again (a trigger row is read back from the
database).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xffl_airflow.slurm import validation as v


@dataclass(frozen=True)
class FacilityLogin:
    """``preamble``: shell lines run on the login node before every Slurm command (``module
    load slurm``, exports); ``slurm_bin``: the absolute folder of the Slurm commands, put first on
    the PATH. Both are the config author's; blank preamble lines are dropped."""

    preamble: tuple[str, ...] = ()
    slurm_bin: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.preamble, str):
            raise v.SlurmInputError("login_preamble", "must be a list of shell lines, got a string")
        lines = tuple(
            v.check_shell_line(line, f"login_preamble[{index}]")
            for index, line in enumerate(self.preamble or ())
        )
        object.__setattr__(self, "preamble", tuple(line for line in lines if line.strip()))
        if self.slurm_bin is not None:
            folder = v.check_path(self.slurm_bin, "slurm_bin")
            if not folder.startswith("/") or ".." in folder.split("/"):
                raise v.SlurmInputError("slurm_bin", f"{folder!r} must be an absolute folder without '..'")

    @classmethod
    def of(cls, preamble: Iterable[str] | None = None, slurm_bin: str | None = None) -> FacilityLogin:
        if isinstance(preamble, str):
            raise v.SlurmInputError("login_preamble", "must be a list of shell lines, got a string")
        return cls(tuple(preamble or ()), slurm_bin)

    def __bool__(self) -> bool:
        return bool(self.preamble or self.slurm_bin)

    def key(self, conn_id: str) -> str:
        """``conn_id``, told apart from the same facility in another login environment."""
        if not self:
            return conn_id
        digest = hashlib.sha256(repr((self.preamble, self.slurm_bin)).encode()).hexdigest()[:12]
        return f"{conn_id}#login-{digest}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: what a trigger serializes and a round's plan stores."""
        return {"preamble": list(self.preamble), "slurm_bin": self.slurm_bin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FacilityLogin:
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"preamble", "slurm_bin"}:
            raise v.SlurmInputError("login", f"must be a mapping of preamble and slurm_bin, got {str(data)[:80]!r}")
        preamble = data.get("preamble") or ()
        if not isinstance(preamble, (list, tuple)):
            raise v.SlurmInputError("login_preamble", "must be a list of shell lines")
        return cls(tuple(preamble), data.get("slurm_bin"))
