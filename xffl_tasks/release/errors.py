"""The release's error types: one line saying what is wrong and where."""

from __future__ import annotations


class ReleaseError(ValueError):
    """A release cannot be made or read: the message names the folder, file or field."""


class SelectionError(ReleaseError):
    """The best round cannot be chosen or a recorded choice cannot be read; names the field."""
