"""A campaign's manifests, read in round order, and the hash of its last one (the chain's end).

Reads only: ``round-NNNN/manifest.json`` from round 0, bounded (``xffl_tasks.manifest.
load_manifest``). The chain's links themselves are checked by ``verify_campaign``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.manifest import MANIFEST, ManifestError, load_manifest, round_dirs, sha256_file
from xffl_tasks.release.errors import ReleaseError


@dataclass(frozen=True)
class CampaignChain:
    """A campaign's manifests (``manifests[i]`` is round i's) and the sha256 of the last one."""

    campaign_dir: Path
    paths: tuple[Path, ...]
    manifests: tuple[dict[str, Any], ...]
    final_sha256: str

    @property
    def campaign(self) -> str:
        return str(self.manifests[-1].get("campaign") or self.campaign_dir.name)

    @property
    def final_round(self) -> int:
        return len(self.manifests) - 1

    @property
    def final_manifest(self) -> Path:
        return self.paths[-1]


def read_campaign(campaign_dir: str | Path, *, through_round: int | None = None) -> CampaignChain:
    """The campaign's manifests from round 0 (to ``through_round`` when given); ReleaseError
    naming the folder or file when a round is missing, out of order or unreadable."""
    campaign_dir = Path(campaign_dir)
    if not campaign_dir.is_dir():
        raise ReleaseError(f"{campaign_dir}: no such campaign folder")
    rounds = round_dirs(campaign_dir)
    if through_round is not None:
        rounds = [(number, path) for number, path in rounds if number <= through_round]
    if not rounds:
        raise ReleaseError(f"{campaign_dir}: no round folders")
    paths, manifests = [], []
    for expected, (number, folder) in enumerate(rounds):
        if number != expected:
            raise ReleaseError(
                f"{campaign_dir}: expected round {expected} next, found {folder.name}"
            )
        path = folder / MANIFEST
        try:
            manifest = load_manifest(path)
        except ManifestError as error:
            raise ReleaseError(f"{path}: unreadable: {error}") from None
        if manifest.get("round") != number:
            raise ReleaseError(f"{path}: records round {manifest.get('round')!r}, not {number}")
        paths.append(path)
        manifests.append(manifest)
    if through_round is not None and len(manifests) != through_round + 1:
        raise ReleaseError(f"{campaign_dir}: has no round {through_round}")
    return CampaignChain(campaign_dir, tuple(paths), tuple(manifests), sha256_file(paths[-1]))
