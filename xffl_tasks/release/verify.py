"""Checking a release folder against itself, the previous release and the campaign's chain.

:func:`verify_release` returns the problems found (empty: it verifies):

- ``release.json`` reads (bounded), is an ``xffl-release`` and names this folder's federation
  and number;
- every file of the release is listed with its sha256 and still has it; nothing else is there;
- the previous release (``n - 1``, beside it) has the ``release.json`` sha256 recorded (and
  release 1 links to none): the releases form a chain as the rounds do;
- the campaign's final manifest still has the recorded sha256, the campaign's manifest chain
  verifies, and no round was added after it;
- the model's files (LoRA: the adapter's) are the global model files the chosen round's
  manifest records, and that manifest has the recorded sha256;
- the choice of round is the chain's (``best.check_selection``, recomputed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xffl_tasks.manifest import (
    ManifestError,
    load_manifest,
    round_dirs,
    sha256_file,
    verify_campaign,
)
from xffl_tasks.release.best import check_selection
from xffl_tasks.release.chain import read_campaign
from xffl_tasks.release.errors import ReleaseError
from xffl_tasks.release.publish import (
    ADAPTER_DIR,
    FORMAT,
    MODEL_DIR,
    NUMBER,
    RELEASE_FILE,
    VERSION,
    files_below,
    global_outputs,
    release_numbers,
)


def is_release_folder(path: str | Path) -> bool:
    return (Path(path) / RELEASE_FILE).is_file()


def _files(release_dir: Path, recorded: object, check_files: bool) -> list[str]:
    if not isinstance(recorded, dict) or not recorded:
        return [f"{RELEASE_FILE}: files: not a map of the release's files to sha256"]
    present = {k for k in files_below(release_dir) if k != RELEASE_FILE}
    problems = [f"{name}: not listed in {RELEASE_FILE}" for name in sorted(present - set(recorded))]
    problems += [f"{name}: missing" for name in sorted(set(recorded) - present)]
    if check_files:
        for name in sorted(present & set(recorded)):
            if sha256_file(release_dir / name) != recorded[name]:
                problems.append(f"{name}: does not match its recorded sha256")
    return problems


def _previous(release_dir: Path, number: int, link: object) -> list[str]:
    if number == 1:
        return [] if link is None else [f"{RELEASE_FILE}: release 1 links to a previous release"]
    if not isinstance(link, dict) or link.get("number") != number - 1:
        return [f"{RELEASE_FILE}: previous_release: does not link to release {number - 1}"]
    path = release_dir.parent / str(number - 1) / RELEASE_FILE
    if not path.is_file():
        return [f"previous release {number - 1}: no {path}"]
    if sha256_file(path) != link.get("release_json_sha256"):
        return [
            f"previous release {number - 1}: {path} was changed (its sha256 is not the recorded one)"
        ]
    return []


def _campaign(data: dict[str, Any]) -> list[str]:
    campaign, source = data.get("campaign"), data.get("source")
    if not isinstance(campaign, dict) or not isinstance(source, dict):
        return [f"{RELEASE_FILE}: campaign/source: not objects"]
    final = Path(str(campaign.get("final_manifest")))
    if not final.is_file():
        return [f"campaign: final manifest {final} is missing"]
    if sha256_file(final) != campaign.get("final_manifest_sha256"):
        return [
            f"campaign: final manifest {final} was changed (its sha256 is not the recorded one)"
        ]
    campaign_dir = Path(str(campaign.get("dir")))
    problems = [
        f"campaign {campaign_dir.name}: {p}"
        for p in verify_campaign(campaign_dir, check_files=False)
    ]
    rounds = round_dirs(campaign_dir) if campaign_dir.is_dir() else []
    final_round = campaign.get("final_round")
    if rounds and rounds[-1][0] != final_round:
        problems.append(
            f"campaign: has round {rounds[-1][0]} after the released final round {final_round!r}"
        )
    try:
        chain = read_campaign(
            campaign_dir, through_round=final_round if isinstance(final_round, int) else None
        )
    except ReleaseError as error:
        return problems + [f"campaign: {error}"]
    if chain.final_manifest.resolve() != final.resolve():
        problems.append(f"campaign: final manifest {final} is not round {final_round}'s")
    problems += check_selection(chain.manifests, data.get("selection") or {})
    chosen = source.get("round")
    if not isinstance(chosen, int) or not 0 <= chosen < len(chain.manifests):
        return problems + [
            f"{RELEASE_FILE}: source.round: {chosen!r} is not a round of the campaign"
        ]
    if (data.get("selection") or {}).get("round") != chosen:
        problems.append(f"{RELEASE_FILE}: source.round {chosen} is not the selection's round")
    if sha256_file(chain.paths[chosen]) != source.get("manifest_sha256"):
        problems.append(f"source: round {chosen}'s manifest has changed since the release")
    where = f"round {chosen}'s manifest"
    try:
        subfolder = (data.get("source") or {}).get("model_subfolder") if isinstance(data.get("source"), dict) else None
        expected = global_outputs(chain.manifests[chosen], where=where,
                                  subfolder=subfolder if isinstance(subfolder, str) and subfolder else None)
    except ReleaseError as error:
        return problems + [str(error)]
    folder = ADAPTER_DIR if data.get("kind") == "lora" else MODEL_DIR
    released = {
        k.split("/", 1)[1]: v
        for k, v in (data.get("files") or {}).items()
        if k.startswith(folder + "/")
    }
    if released != expected:
        problems.append(f"{folder}/: its files are not the global model files {where} records")
    base_files = (chain.manifests[chosen].get("inputs") or {}).get("base_model_files")
    if data.get("kind") == "lora" and base_files and source.get("base_model_files") != base_files:
        problems.append(f"source: the base model's files are not the ones {where} records")
    return problems


def verify_release(release_dir: str | Path, *, check_files: bool = True) -> list[str]:
    """Checks a release folder (see the module's list); the problems found, each one line."""
    release_dir = Path(release_dir)
    try:
        data = load_manifest(release_dir / RELEASE_FILE)
    except ManifestError as error:
        return [f"{release_dir / RELEASE_FILE}: unreadable: {error}"]
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        return [f"{RELEASE_FILE}: not {FORMAT!r} version {VERSION}"]
    problems = []
    number = data.get("number")
    if not NUMBER.fullmatch(release_dir.name) or number != int(release_dir.name):
        problems.append(
            f"{RELEASE_FILE}: records release {number!r}, the folder is {release_dir.name!r}"
        )
    if data.get("federation") != release_dir.parent.name:
        problems.append(f"{RELEASE_FILE}: records federation {data.get('federation')!r}, "
                        f"the folder is in {release_dir.parent.name!r}")  # fmt: skip
    problems += _files(release_dir, data.get("files"), check_files)
    if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
        problems += _previous(release_dir, number, data.get("previous_release"))
    return problems + _campaign(data)


def verify_releases(federation_dir: str | Path, *, check_files: bool = True) -> list[str]:
    """Every release of a federation's folder, each problem prefixed ``release <n>:``."""
    problems = []
    for number in release_numbers(federation_dir):
        for problem in verify_release(Path(federation_dir) / str(number), check_files=check_files):
            problems.append(f"release {number}: {problem}")
    return problems
