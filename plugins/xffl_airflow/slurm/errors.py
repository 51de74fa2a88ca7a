"""Errors of the pure Slurm helpers (no Airflow types here)."""

from __future__ import annotations

from xffl_airflow.secrets_scrub import scrub_env


class SlurmInputError(ValueError):
    """A value for a Slurm job (option, name, path, id) is invalid; the message names the field.

    The message may echo the value (cut, escaped): every run of it that comes from an
    ``${XFFL_*}`` variable is masked (``xffl_airflow.secrets_scrub``; docs/security.md, R3).
    """

    def __init__(self, field: str, message: str):
        message = scrub_env(message)
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class SlurmOutputError(ValueError):
    """A Slurm command printed something we cannot read; the message quotes it."""
