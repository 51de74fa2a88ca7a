"""The refusals of a federation's round: each fails its task at once, without retries.

- ``RunConfError``: a run's conf asks for something the config did not open (names the field);
- ``RoundError``: a round cannot go on (names the campaign, round and facility, and why);
- ``ConfigError``: the config file is unreadable or invalid (names the file and field).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A federation config is unreadable or invalid; the message names the file and field."""


class RunConfError(ValueError):
    """A run's conf asks for something the config did not open; the message names the field."""


class RoundError(RuntimeError):
    """A round cannot go on; the message says which campaign, round and facility, and why."""


class CampaignOwnedError(RoundError):
    """A campaign belongs to another federation DAG; nothing of it is read or written."""


class PlanError(RoundError):
    """A round's sealed plan is missing, unreadable or not this run's; nothing is obeyed."""


class FacilityRefused(RoundError):
    """What a facility sent back fails a check: it is set aside and left out of the round, like
    a facility whose job failed (never retried: the same outputs would fail again)."""
