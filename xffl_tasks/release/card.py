"""The release's model card (``README.md``), written from the campaign's manifests.

:func:`render_card` is pure and deterministic: the same manifests and inputs give the same
text, byte for byte (no clock is read; the only times shown are those the manifests record).
It shows the base model, the facilities with their data descriptions, the rounds, the
validation curve (each global model's sample-weighted loss), the aggregation strategy, the
privacy ledger when the manifests hold one (a ``privacy`` section per round), the chain's final
hash, the comparison with the previous release, and why this round was chosen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from xffl_tasks.release.best import FINAL, Selection
from xffl_tasks.release.compare import ReleaseComparison

#: The widest privacy table: further entries are listed as JSON under it.
MAX_PRIVACY_COLUMNS = 8


def _cell(value: object) -> str:
    """One Markdown table cell: one line, pipes escaped."""
    text = value if isinstance(value, str) else _value(value)
    return " ".join(text.split()).replace("|", "\\|") or " "


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _strategies(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    found: list[str] = []
    for manifest in manifests:
        name = (manifest.get("aggregation") or {}).get("strategy")
        if isinstance(name, str) and name not in found:
            found.append(name)
    return found


def _participants(manifest: Mapping[str, Any]) -> list[str]:
    names = manifest.get("participants")
    return [str(n) for n in names] if isinstance(names, list) else []


def _privacy_rows(manifests: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[object]]]:
    """(columns, rows): each round's ``privacy`` section flattened one level (``a.b``)."""
    flat: list[tuple[int, dict[str, object]]] = []
    for manifest in manifests:
        section = manifest.get("privacy")
        if section is None:
            continue
        values: dict[str, object] = {}
        if isinstance(section, Mapping):
            for key, value in section.items():
                if isinstance(value, Mapping):
                    values.update({f"{key}.{inner}": item for inner, item in value.items()})
                else:
                    values[str(key)] = value
        else:
            values["privacy"] = section
        flat.append((manifest.get("round"), values))
    columns = sorted({key for _, values in flat for key in values})
    shown = columns[:MAX_PRIVACY_COLUMNS]
    rows = []
    for number, values in flat:
        rest = {k: values[k] for k in columns[MAX_PRIVACY_COLUMNS:] if k in values}
        rows.append(
            [
                number,
                *(values.get(k) for k in shown),
                *([rest or None] if len(columns) > len(shown) else []),
            ]
        )
    header = ["Round", *shown, *(["more"] if len(columns) > len(shown) else [])]
    return header, rows


def render_card(
    *,
    federation: str,
    manifests: Sequence[Mapping[str, Any]],
    final_manifest_sha256: str,
    selection: Selection,
    base_model: str,
    facilities: Mapping[str, str],
    comparison: ReleaseComparison | None = None,
    strategy: str | None = None,
    title: str | None = None,
) -> str:
    """The model card's Markdown. ``manifests``: the campaign's, in round order from round 0;
    ``facilities``: each facility's name and a description of its data (from the config);
    ``strategy``: shown instead of the strategies the manifests record."""
    last = manifests[-1]
    campaign = selection.campaign
    lora = any((m.get("inputs") or {}).get("base_model") for m in manifests)
    strategies = [strategy] if strategy else _strategies(manifests) or ["(not recorded)"]
    lines = [
        f"# {title or f'{federation}: campaign {campaign}, round {selection.round}'}",
        "",
        f"The global model of round {selection.round} of campaign **{campaign}** of the federation "
        f"**{federation}**, chosen by its validation loss: {_loss(selection.loss)} (sample-weighted "
        "mean cross-entropy per token on the facilities' private validation data).",
        "",
        "## Model",
        "",
        f"- Base model: `{base_model}`",
        "- Fine-tuning: " + ("LoRA (lora-stacked): every round's exact adapter update merged into the base "
                             "(`model/`)" if "lora-stacked" in strategies else
                             "LoRA: the adapter (`adapter/`) merged into the base (`model/`)" if lora
                             else "full model (`model/`)"),  # fmt: skip
        f"- Aggregation strategy: {', '.join(strategies)}",
        f"- Rounds: {len(manifests)} (0 to {len(manifests) - 1}), "
        f"{_value(manifests[0].get('started_at'))} to {_value(last.get('finished_at'))}",
        f"- The campaign stopped: {_value((last.get('decision') or {}).get('reason'))}",
        "",
        "## Facilities",
        "",
    ]  # fmt: skip
    names = sorted(set(facilities) | {n for m in manifests for n in _participants(m)})
    lines += _table(
        ["Facility", "Data", "Rounds trained"],
        [[name, facilities.get(name, "(not described)"),
          f"{sum(name in _participants(m) for m in manifests)} of {len(manifests)}"] for name in names],
    )  # fmt: skip
    lines += [
        "",
        "## Validation loss per round",
        "",
        "The sample-weighted validation loss of each round's global model, measured by the "
        "facilities on their validation data before training on it in the next round (the last "
        "one by the final evaluation after the campaign stopped).",
        "",
    ]
    rows: list[list[object]] = [["start", len(_participants(manifests[0])), _loss(selection.input_loss),
                                 "the model the campaign started from"]]  # fmt: skip
    for candidate in selection.candidates:
        following = candidate.round + 1
        count = len(_participants(manifests[following])) if following < len(manifests) else None
        if candidate.source == FINAL and selection.final_evaluation:
            count = len(selection.final_evaluation.losses)
        marker = " (selected)" if candidate.round == selection.round else ""
        rows.append([f"{candidate.round}{marker}", count, _loss(candidate.loss), candidate.source])
    lines += _table(["Global model of round", "Facilities evaluating", "Loss", "From"], rows)
    lines += [
        "",
        "## Selection",
        "",
        f"Rule: {selection.rule}.",
        "",
        f"{selection.reason[:1].upper()}{selection.reason[1:]}.",
    ]
    lines += ["", "## Comparison with the previous release", ""]
    if comparison is None:
        lines.append("No comparison was recorded.")
    else:
        lines += [
            f"- Previous release: {_value(comparison.previous_release)} "
            f"(loss {_loss(comparison.previous_loss)}, evaluated again in the final evaluation)",
            f"- This model: {_loss(comparison.candidate_loss)}",
            f"- Improvement: {_loss(comparison.improvement)}; required margin: {comparison.margin:.6f}",
            f"- Verdict: {comparison.reason}",
        ]
    header, privacy = _privacy_rows(manifests)
    if privacy:
        lines += ["", "## Privacy ledger", "", "As recorded in each round's manifest.", ""]
        lines += _table(header, privacy)
    lines += [
        "",
        "## Provenance",
        "",
        f"- Campaign chain: {len(manifests)} round manifest(s), each linked to the previous by sha256; "
        f"the last (round {len(manifests) - 1}) has sha256 `{final_manifest_sha256}`",
        "- `release.json` beside this card holds the sha256 of every file of the release, the "
        "campaign's final manifest and the previous release's `release.json`",
        "- Check it all: `python -m xffl_tasks.verify <this release folder>`",
        "",
    ]
    return "\n".join(lines)
