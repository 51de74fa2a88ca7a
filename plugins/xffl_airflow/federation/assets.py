"""The Airflow asset of a federation's global model: one per config, an event per round.

Every round's ``finalize`` emits an event for it; a DAG scheduled on it
(``schedule=[global_model_asset(config)]``) runs once per finished round. The DAG is per
config, but its scheduled runs start campaigns of their own (``<campaign>-<date>``): the asset
is the config's, and the event's extra names the campaign and round it comes from, with the
model's folder, the sha256 of each of its files, the weighted validation loss and the
convergence decision. (An ``AssetAlias`` per campaign would not do: a DAG scheduled on an
alias only hears the assets the alias resolved to when that DAG was parsed, so a new
campaign's first events would be lost.)

    URI   xffl://<campaign><storage>/global-model    (the config's campaign and storage:
          xffl://demo/srv/xffl/global-model; the event's extra says where the files are)
    name  xffl_<campaign>_global_model

An event's extra is only a claim: anyone allowed to create asset events (the REST API's
``POST /api/v2/assets/events``) can send one naming any folder. A consumer acts on the model
only through ``verify_global_model_event``, which checks the claim against the campaign's own
records in storage and returns the verified folder (docs/federation.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.layout import OWNER
from xffl_airflow.federation.names import CAMPAIGN_RE, MAX_ROUND
from xffl_tasks.manifest import (
    MANIFEST,
    ManifestError,
    load_manifest,
    round_dir_name,
    sha256_file,
    verify_campaign,
)

SCHEME = "xffl"  # no Airflow normalizer claims it: the URI is kept as written


def global_model_asset(config: Any) -> Asset:
    """The asset of ``config``'s global model (a ``FederationConfig``)."""
    storage = str(config.storage).rstrip("/")
    return Asset(
        name=f"xffl_{config.campaign.replace('-', '_')}_global_model",
        uri=f"{SCHEME}://{config.campaign}{storage}/global-model",
        group="xffl",
        extra={"campaign": config.campaign, "storage": storage},
    )


class GlobalModelEventRefused(AirflowFailException, ValueError):
    """A global-model asset event that does not verify; the message says what failed. It fails
    the consumer's task without retries: the same event would fail again."""


@dataclass(frozen=True)
class VerifiedGlobalModel:
    """A global model whose asset event verified: the folder and the values are the campaign's
    own records (its manifest), not the event's word.

    :param path: the round's ``global/`` folder, symlinks resolved, directly under
        ``<storage>/<campaign>/round-NNNN``
    :param sha256: every file of the model, relative to ``path``, and its verified sha256
    :param decision: the convergence decision the manifest records (``stop``, ``reason``)
    """

    campaign: str
    round: int
    run_id: str | None
    path: Path
    manifest: Path
    sha256: dict[str, str]
    weighted_val_loss: float | None = None
    decision: dict[str, Any] = field(default_factory=dict)


_ROUND_PROBLEM = re.compile(r"^round-(\d{4,})\b")


def _refuse(what: str) -> GlobalModelEventRefused:
    return GlobalModelEventRefused(f"global-model event refused: {what}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _inside(path: Path, parent: Path, what: str) -> Path:
    """``path`` with symlinks resolved, which must be a direct child of ``parent`` (resolved)
    named as ``path`` is: a symlink that leads elsewhere is refused."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refuse(f"{what} {path} does not exist") from None
    if real.parent != parent or real.name != path.name:
        raise _refuse(f"{what} {path} leads to {real}, not a folder of {parent}")
    return real


def verify_global_model_event(
    extra: Mapping[str, Any],
    *,
    storage: str | Path,
    dag_id: str,
    check_all_files: bool = False,
) -> VerifiedGlobalModel:
    """Verifies a global-model asset event's ``extra`` against the campaign in ``storage`` that
    the federation DAG ``dag_id`` made; returns the verified model, or raises
    ``GlobalModelEventRefused`` naming what failed:

    - ``campaign`` is a campaign name (1-64 of a-z 0-9 _ -) and ``round`` a whole number;
    - ``<storage>/<campaign>`` and its ``round-NNNN`` are real folders directly in their parents
      (symlinks resolved); the campaign's owner record, when there is one, names ``dag_id``;
    - ``round-NNNN/manifest.json`` reads and records ``dag_id``, the campaign and the round (and
      the event's ``run_id``, when the event gives one);
    - the event's ``sha256`` equals the manifest's ``outputs`` exactly; each is a file under
      ``global/`` that hashes to it now; the event's ``path`` and ``manifest``, when given, are
      that folder and that file;
    - the campaign's manifest chain verifies up to this round (``xffl_tasks.manifest.
      verify_campaign``; later rounds may be under way; with ``check_all_files``, every
      round's outputs are hashed too).
    """
    if not isinstance(extra, Mapping):
        raise _refuse(f"the event's extra is not a mapping but {type(extra).__name__}")
    campaign, round_number = extra.get("campaign"), extra.get("round")
    if not isinstance(campaign, str) or not CAMPAIGN_RE.fullmatch(campaign):
        raise _refuse(
            f"campaign {_shown(campaign)} is not a campaign name (1-64 of a-z, 0-9, _ and -)"
        )
    if (
        isinstance(round_number, bool)
        or not isinstance(round_number, int)
        or not 0 <= round_number <= MAX_ROUND
    ):
        raise _refuse(f"round {_shown(round_number)} is not a round number")
    try:
        root = Path(storage).resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refuse(f"campaign storage {storage} does not exist") from None
    campaign_dir = _inside(root / campaign, root, f"campaign {campaign}: folder")
    owner_path = campaign_dir / OWNER
    if owner_path.is_file():
        try:
            owner = load_manifest(owner_path).get("dag_id")
        except ManifestError as error:
            raise _refuse(
                f"campaign {campaign}: its owner record {owner_path} is unreadable: {error}"
            ) from None
        if owner != dag_id:
            raise _refuse(f"campaign {campaign} belongs to DAG {_shown(owner)}, not {dag_id}")
    where = f"campaign {campaign} round {round_number}"
    round_dir = _inside(
        campaign_dir / round_dir_name(round_number), campaign_dir, f"{where}: folder"
    )
    manifest_path = round_dir / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise _refuse(f"{where}: no manifest at {manifest_path}")
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as error:
        raise _refuse(f"{where}: manifest {manifest_path} is unreadable: {error}") from None
    for key, expected in (("dag_id", dag_id), ("campaign", campaign), ("round", round_number)):
        if manifest.get(key) != expected or type(manifest.get(key)) is not type(expected):
            raise _refuse(f"{where}: manifest {manifest_path} records {key} {_shown(manifest.get(key))}, "
                          f"not {_shown(expected)}")  # fmt: skip
    if extra.get("run_id") is not None and extra.get("run_id") != manifest.get("run_id"):
        raise _refuse(f"{where}: run_id {_shown(extra.get('run_id'))} is not the manifest's "
                      f"{_shown(manifest.get('run_id'))}")  # fmt: skip
    outputs, claimed = manifest.get("outputs"), extra.get("sha256")
    if not isinstance(outputs, dict) or not outputs:
        raise _refuse(f"{where}: manifest {manifest_path} lists no outputs")
    if claimed != outputs:
        raise _refuse(f"{where}: the event's sha256 is not the manifest's outputs")
    global_dir = round_dir / "global"
    if global_dir.is_symlink() or not global_dir.is_dir():
        raise _refuse(f"{where}: no global model folder {global_dir}")
    files: dict[str, str] = {}
    for relative, digest in sorted(outputs.items()):
        parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
        if (
            len(parts) < 2
            or parts[0] != "global"
            or any(p in ("..", ".", "") for p in parts)
            or relative.startswith("/")
        ):
            raise _refuse(f"{where}: output {_shown(relative)} is not a file of global/")
        target = round_dir.joinpath(*parts)
        try:
            real = target.resolve(strict=True)
        except (OSError, RuntimeError):
            raise _refuse(f"{where}: output {relative} is missing") from None
        if global_dir not in real.parents or target.is_symlink() or not real.is_file():
            raise _refuse(f"{where}: output {relative} is not a regular file inside {global_dir}")
        if sha256_file(real) != digest:
            raise _refuse(f"{where}: output {relative} does not hash to its recorded sha256")
        files[PurePosixPath(*parts[1:]).as_posix()] = digest
    for key, expected in (("path", global_dir), ("manifest", manifest_path)):
        given = extra.get(key)
        if given is not None:
            try:
                same = isinstance(given, str) and Path(given).resolve(strict=True) == expected
            except (OSError, RuntimeError):
                same = False
            if not same:
                raise _refuse(f"{where}: the event's {key} {_shown(given)} is not {expected}")
    # rounds after this one may be under way (no manifest yet): the chain up to it must hold
    problems = [p for p in verify_campaign(campaign_dir, check_files=check_all_files)
                if not ((m := _ROUND_PROBLEM.match(p)) and int(m.group(1)) > round_number)]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:3]) + (
            f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        )
        raise _refuse(f"campaign {campaign}: its manifest chain does not verify: {shown}")
    loss = manifest.get("weighted_val_loss")
    return VerifiedGlobalModel(
        campaign=campaign,
        round=round_number,
        run_id=manifest.get("run_id") if isinstance(manifest.get("run_id"), str) else None,
        path=global_dir,
        manifest=manifest_path,
        sha256=files,
        weighted_val_loss=float(loss)
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
        else None,
        decision=dict(manifest["decision"]) if isinstance(manifest.get("decision"), dict) else {},
    )
