"""The Airflow asset of a federation's releases: an event per release.

    URI   xffl://<campaign of the config>/release
    name  xffl_<campaign>_release

The event's extra names the release (``federation``, ``number``, ``path``) and the sha256 of its
``release.json``. It is a claim, like every asset event: a consumer acts on a release only
through ``verify_release_event``, which finds the release folder itself (under the configured
releases root, the number given), checks the event's hash against its ``release.json`` and runs
``xffl_tasks.release.verify_release`` (every file's sha256, the links to the campaign's chain
and to the previous release, the best-round choice).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.assets import SCHEME


def release_asset(config: Any) -> Asset:
    """The asset of ``config``'s releases (a ``FederationConfig``)."""
    return Asset(name=f"xffl_{config.campaign.replace('-', '_')}_release", uri=f"{SCHEME}://{config.campaign}/release",
                 group="xffl", extra={"federation": config.campaign})  # fmt: skip


class ReleaseEventRefused(AirflowFailException, ValueError):
    """A release event whose claim does not hold: the message says what failed."""


def verify_release_event(extra: Mapping[str, Any], *, releases_root: str | Path, federation: str) -> Path:
    """The release folder an event of ``federation``'s release asset names, once verified."""
    from xffl_tasks.manifest import sha256_file
    from xffl_tasks.release.verify import verify_release

    def refuse(what: str) -> ReleaseEventRefused:
        return ReleaseEventRefused(f"release event refused: {what}")

    if not isinstance(extra, Mapping) or extra.get("federation") != federation:
        raise refuse(f"it is not an event of federation {federation!r}")
    number = extra.get("number")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 10**9:
        raise refuse(f"number {str(number)[:40]!r} is not a release number")
    digest = extra.get("release_json_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise refuse("release_json_sha256 is not a sha256")
    root = Path(releases_root).resolve()
    folder = (root / federation / str(number)).resolve()
    if folder.parent != root / federation or not (folder / "release.json").is_file():
        raise refuse(f"no release {number} of {federation} in {root}")
    if sha256_file(folder / "release.json") != digest:
        raise refuse(f"release {number}'s release.json does not have the event's sha256")
    problems = verify_release(folder)
    if problems:
        raise refuse(f"release {number} does not verify: {problems[0]}")
    return folder
