"""The campaign view's release section: the best round the release run chose and why, whether
it was released, and the federation's releases (read-only, from storage; docs/release.md)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from xffl_tasks.manifest import read_manifest


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def federation_releases(root: str | Path, federation: str) -> list[dict[str, Any]]:
    """Each release of ``federation`` (newest first): number, campaign, round, when."""
    folder = Path(root) / federation
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if not entry.name.isdigit():
                continue
            record = read_manifest(entry / "release.json")
            if record is None:
                continue
            source = record.get("source") if isinstance(record.get("source"), dict) else {}
            selection = record.get("selection") if isinstance(record.get("selection"), dict) else {}
            found.append({"number": int(entry.name), "campaign": source.get("campaign"), "round": source.get("round"),
                          "loss": selection.get("loss"), "published_at": record.get("published_at")})  # fmt: skip
    return sorted(found, key=lambda r: -r["number"])


def _answer(approval: dict[str, Any] | None, decision: dict[str, Any]) -> str | None:
    """"rejected by NAME" (or "not approved: timeout") when the person's answer under the
    decision's plan said no; None when there is no such answer."""
    if not isinstance(approval, dict) or approval.get("approved") is not False:
        return None
    if approval.get("plan_sha256") != decision.get("plan_sha256"):
        return None
    who = approval.get("responded_by")
    name = who.get("name") if isinstance(who, dict) else who
    if approval.get("error"):
        return f"not approved: {str(approval['error'])[:40]}"
    return f"rejected by {str(name)[:64]}" if name else "rejected"


def release_block(campaign: str, decision: dict[str, Any] | None, releases: list[dict[str, Any]],
                  approval: dict[str, Any] | None = None) -> str:  # fmt: skip
    """HTML: the campaign's release decision (if its release run decided), the person's answer
    when it was no, and the federation's releases."""
    parts = ["<h2>release</h2>"]
    if decision is None:
        parts.append('<p id="release-decision" class="muted">no release decision for this campaign yet</p>')
    else:
        selection = decision.get("selection") if isinstance(decision.get("selection"), dict) else {}
        mine = [r for r in releases if r["campaign"] == campaign and r["round"] == selection.get("round")]
        refused = _answer(approval, decision)
        if mine:
            released = f"released as {mine[0]['number']}"
        elif decision.get("release") and refused is None:
            released = "to be released"
        else:
            released = "not released" + (f" ({refused})" if refused else "")
        parts.append(
            f'<p id="release-decision">best round <span id="best-round">{_e(selection.get("round"))}</span>: '
            f'{_e(selection.get("reason") or "")} <strong id="released">{_e(released)}</strong>; '
            f'{_e(decision.get("reason") or "")}</p>'
        )
    if releases:
        rows = "".join(
            f'<tr data-release="{_e(r["number"])}"{" class=highlight" if r["campaign"] == campaign else ""}>'
            f'<td>{_e(r["number"])}</td><td class="text">{_e(r["campaign"])}</td><td>{_e(r["round"])}</td>'
            f'<td>{_loss(r["loss"])}</td>'
            f'<td class="text">{_e(r["published_at"] or "-")}</td></tr>'
            for r in releases
        )
        parts.append('<table id="releases"><thead><tr><th>release</th><th>campaign</th><th>round</th>'
                     f'<th>loss</th><th>published</th></tr></thead><tbody>{rows}</tbody></table>')  # fmt: skip
    return "\n".join(parts)
