"""Errors of the pure Slurm helpers (no Airflow types here)."""

from __future__ import annotations


class SlurmInputError(ValueError):
    """A value for a Slurm job (option, name, path, id) is invalid; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class SlurmOutputError(ValueError):
    """A Slurm command printed something we cannot read; the message quotes it."""
