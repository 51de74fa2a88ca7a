"""The campaign view's page: pure functions from round manifests to HTML with inline SVG.

No I/O and no Airflow here: ``facility_rows`` and ``round_summaries`` shape the manifests
(building on :func:`xffl_airflow.federation.report.campaign_rows`), ``loss_chart`` and
``timing_chart`` draw them, ``render_page`` puts it all in one self-contained page (no script,
nothing fetched). Every value read from a manifest is escaped: facilities report their own
metrics and failure reasons.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from xffl_airflow.federation.report import _get, campaign_rows

GLOBAL = "(global)"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TIMING_PARTS = (
    ("queue", "queue_s", "#9ecae1"),
    ("training", "run_s", "#3182bd"),
    ("push", "push_s", "#a1d99b"),
    ("pull", "pull_s", "#31a354"),
)
AGGREGATION_COLOUR = "#fd8d3c"


#: Values beyond this are not shown (a manifest of an older version may hold any number; the
#: charts' scales could not draw it): "-" instead.
MAX_SHOWN = 1e12


def number(value: Any) -> float | None:
    """A finite float within ``MAX_SHOWN``, or None for anything else (missing, text, NaN,
    booleans, a loss of 1e308)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and abs(value) <= MAX_SHOWN else None


def fmt(value: Any, spec: str = "{:.2f}") -> str:
    value = number(value)
    return "-" if value is None else spec.format(value)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# -- data ----------------------------------------------------------------------------------


def facility_rows(manifests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows (one per round and facility, then the round's global row) with what
    the view adds: the facility's weight, push/pull MB/s and why it was left out."""
    by_round = {m.get("round"): m for m in manifests}
    rows = []
    for row in campaign_rows(list(manifests)):
        manifest = by_round.get(row["round"]) or {}
        row = dict(row)
        if row["facility"] == GLOBAL:
            row.update(weight=None, push_mbps=None, pull_mbps=None, reason=None)
        else:
            facility = (manifest.get("facilities") or {}).get(row["facility"]) or {}
            reason = facility.get("reason") or (manifest.get("missing") or {}).get(row["facility"])
            row.update(
                weight=facility.get("weight"),
                push_mbps=_get(facility, "push", "mbps"),
                pull_mbps=_get(facility, "pull", "mbps"),
                reason=reason,
            )
        rows.append(row)
    return rows


def round_summaries(manifests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per round: losses, decision, aggregation, who took part and who was left out."""
    summaries = []
    for manifest in manifests:
        decision = manifest.get("decision") if isinstance(manifest.get("decision"), dict) else {}
        left_out = dict(manifest.get("missing") or {})
        left_out.update(manifest.get("rejected") or {})
        summaries.append(
            {
                "round": manifest.get("round"),
                "run_id": manifest.get("run_id"),
                "started_at": manifest.get("started_at"),
                "finished_at": manifest.get("finished_at"),
                "participants": list(manifest.get("participants") or []),
                "left_out": left_out,
                "loss_before": manifest.get("weighted_val_loss"),
                "loss_after": manifest.get("weighted_val_loss_after"),
                "aggregation_s": _get(manifest, "aggregation", "seconds"),
                "strategy": _get(manifest, "aggregation", "strategy"),
                "update_norm": _get(manifest, "aggregation", "global_update_norm"),
                "stop": bool(decision.get("stop")),
                "reason": decision.get("reason"),
                "improvement": decision.get("improvement"),
            }
        )
    return summaries


# -- charts --------------------------------------------------------------------------------

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 16, 40


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _frame(title: str, y_label: str, x_values: Sequence[int], y_ticks: Sequence[float], chart_id: str):
    """The SVG's opening, axes and tick labels; returns (parts, x_of, y_of)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x_low, x_high = min(x_values), max(x_values)
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def x_of(x: float) -> float:
        if x_high == x_low:
            return LEFT + plot_w / 2
        return LEFT + 20 + (x - x_low) / (x_high - x_low) * (plot_w - 40)

    def y_of(y: float) -> float:
        return TOP + plot_h - (y - y_low) / ((y_high - y_low) or 1.0) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{_e(chart_id)}" class="chart" role="img" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#555"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#555"/>',
    ]
    for tick in y_ticks:
        y = y_of(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick:g}</text>')
    for x in sorted(set(x_values)):
        parts.append(
            f'<text x="{x_of(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" font-size="11">{x}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="12">round</text>'
    )
    parts.append(
        f'<text x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">{_e(y_label)}</text>'
    )
    return parts, x_of, y_of


def _legend(entries: Iterable[tuple[str, str]]) -> list[str]:
    parts = []
    for index, (label, colour) in enumerate(entries):
        y = TOP + 8 + index * 18
        x = WIDTH - RIGHT + 12
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{x + 18}" y="{y + 1}" font-size="11">{_e(label)}</text>')
    return parts


def _empty(chart_id: str, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{_e(chart_id)}" class="chart empty" role="img" '
        f'width="{WIDTH}" height="60" viewBox="0 0 {WIDTH} 60"><title>{_e(title)}</title>'
        f'<text x="10" y="30" font-size="13">{_e(title)}: nothing recorded yet</text></svg>'
    )


def loss_chart(rows: Sequence[dict[str, Any]], *, chart_id: str = "loss-chart") -> str:
    """Validation loss of the global model each facility received, per round: one line per
    facility and a thick one for the sample-weighted global loss."""
    title = "validation loss of the global model received"
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        value = number(row.get("loss_before"))
        if value is not None and isinstance(row.get("round"), int):
            series.setdefault(row["facility"], []).append((row["round"], value))
    if not series:
        return _empty(chart_id, title)
    values = [v for points in series.values() for _, v in points]
    rounds = [r for points in series.values() for r, _ in points]
    low, high = min(values), max(values)
    margin = (high - low) * 0.1 or abs(high) * 0.05 or 0.5
    ticks = _ticks(low - margin, high + margin)
    parts, x_of, y_of = _frame(title, "loss", rounds, ticks, chart_id)
    names = sorted(n for n in series if n != GLOBAL) + ([GLOBAL] if GLOBAL in series else [])
    legend = []
    for index, name in enumerate(names):
        points = sorted(series[name])
        colour = "#000" if name == GLOBAL else PALETTE[index % len(PALETTE)]
        width = 3 if name == GLOBAL else 1.5
        label = "weighted (global)" if name == GLOBAL else name
        coords = " ".join(f"{x_of(r):.1f},{y_of(v):.1f}" for r, v in points)
        parts.append(
            f'<polyline class="series" data-series="{_e(name)}" points="{coords}" fill="none" '
            f'stroke="{colour}" stroke-width="{width}"/>'
        )
        for r, v in points:
            parts.append(
                f'<circle cx="{x_of(r):.1f}" cy="{y_of(v):.1f}" r="3" fill="{colour}">'
                f"<title>{_e(label)} round {r}: {v:.4f}</title></circle>"
            )
        legend.append((label, colour))
    parts += _legend(legend)
    parts.append("</svg>")
    return "\n".join(parts)


def timing_chart(rows: Sequence[dict[str, Any]], *, chart_id: str = "timing-chart") -> str:
    """Seconds per round, stacked: queue, training, push and pull of the slowest facility at
    each step, then the aggregation (what report.png draws)."""
    title = "time per round (slowest facility per step, then aggregation)"
    rounds = sorted({r["round"] for r in rows if isinstance(r.get("round"), int)})
    if not rounds:
        return _empty(chart_id, title)
    stacks: dict[int, list[tuple[str, float, str]]] = {}
    for rnd in rounds:
        stack = []
        for label, key, colour in TIMING_PARTS:
            values = [number(r.get(key)) for r in rows if r["round"] == rnd and r["facility"] != GLOBAL]
            values = [v for v in values if v is not None]
            stack.append((label, max(values) if values else 0.0, colour))
        aggregation = [number(r.get("aggregation_s")) for r in rows if r["round"] == rnd and r["facility"] == GLOBAL]
        stack.append(("aggregation", next((v for v in aggregation if v is not None), 0.0), AGGREGATION_COLOUR))
        stacks[rnd] = [(label, max(value, 0.0), colour) for label, value, colour in stack]
    top = max(sum(v for _, v, _ in stack) for stack in stacks.values()) or 1.0
    ticks = _ticks(0.0, top * 1.05)
    parts, x_of, y_of = _frame(title, "seconds", rounds, ticks, chart_id)
    plot_w = WIDTH - LEFT - RIGHT
    bar = max(6.0, min(40.0, (plot_w - 40) / max(len(rounds), 1) * 0.6))
    for rnd, stack in stacks.items():
        bottom = 0.0
        for label, value, colour in stack:
            if value <= 0:
                continue
            y_top, y_bottom = y_of(bottom + value), y_of(bottom)
            parts.append(
                f'<rect class="bar" data-round="{rnd}" data-part="{label}" x="{x_of(rnd) - bar / 2:.1f}" '
                f'y="{y_top:.1f}" width="{bar:.1f}" height="{max(y_bottom - y_top, 0.5):.1f}" fill="{colour}">'
                f"<title>round {rnd} {label}: {value:.2f} s</title></rect>"
            )
            bottom += value
    parts += _legend([(label, colour) for label, _, colour in TIMING_PARTS] + [("aggregation", AGGREGATION_COLOUR)])
    parts.append("</svg>")
    return "\n".join(parts)


# -- page ----------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 12px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px 0; } h2 { font-size: 15px; margin: 18px 0 6px 0; }
table { border-collapse: collapse; margin-bottom: 8px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text { text-align: left; white-space: normal; }
tr.global td { background: #f7f7f7; font-weight: 600; }
tr.highlight td { outline: 2px solid #f0ad4e; }
.verification { padding: 6px 10px; border-radius: 4px; display: inline-block; margin: 4px 0; }
.verification.ok { background: #dff0d8; color: #1d5e20; } .verification.fail { background: #f2dede; color: #8a1f1f; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } .muted { color: #777; }
ul.problems { margin: 4px 0; } nav a { margin-right: 10px; }
.warn { background: #fcf8e3; color: #6b4e0f; padding: 6px 10px; border-radius: 4px; margin: 4px 0; }
"""

FACILITY_COLUMNS = (
    ("round", "round", None),
    ("facility", "facility", None),
    ("status", "status", None),
    ("job", "job", None),
    ("loss_before", "loss before", "{:.4f}"),
    ("loss_after", "loss after", "{:.4f}"),
    ("samples", "samples", "{:.0f}"),
    ("weight", "weight", "{:.3f}"),
    ("queue_s", "queue s", "{:.1f}"),
    ("run_s", "run s", "{:.1f}"),
    ("push_s", "push s", "{:.2f}"),
    ("push_mbps", "push MB/s", "{:.1f}"),
    ("pull_s", "pull s", "{:.2f}"),
    ("pull_mbps", "pull MB/s", "{:.1f}"),
    ("aggregation_s", "aggregation s", "{:.2f}"),
    ("epsilon", "ε spent", "{:.3f}"),
    ("reason", "left out because", None),
)


def _cell(key: str, value: Any, spec: str | None) -> str:
    if spec is None:
        css = ' class="text"' if key in ("facility", "status", "reason") else ""
        return f'<td data-col="{key}"{css}>{"-" if value is None else _e(value)}</td>'
    return f'<td data-col="{key}">{fmt(value, spec)}</td>'


def facility_table(rows: Sequence[dict[str, Any]], *, highlight_round: int | None = None) -> str:
    head = "".join(f'<th data-col="{key}">{_e(title)}</th>' for key, title, _ in FACILITY_COLUMNS)
    body = []
    for row in rows:
        classes = ["global"] if row["facility"] == GLOBAL else []
        if highlight_round is not None and row["round"] == highlight_round:
            classes.append("highlight")
        css = f' class="{" ".join(classes)}"' if classes else ""
        cells = "".join(_cell(key, row.get(key), spec) for key, _, spec in FACILITY_COLUMNS)
        body.append(f'<tr data-round="{_e(row["round"])}" data-facility="{_e(row["facility"])}"{css}>{cells}</tr>')
    return f'<table id="facilities"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def rounds_table(summaries: Sequence[dict[str, Any]], *, highlight_round: int | None = None) -> str:
    head = (
        "<th>round</th><th>run</th><th>weighted loss before</th><th>weighted loss after</th>"
        "<th>aggregation</th><th>aggregation s</th><th>decision</th><th>facilities left out</th>"
    )
    body = []
    for s in summaries:
        css = ' class="highlight"' if highlight_round is not None and s["round"] == highlight_round else ""
        left_out = "; ".join(f"{name}: {reason}" for name, reason in sorted(s["left_out"].items())) or "-"
        decision = f'{"stop" if s["stop"] else "continue"}: {s["reason"] or "-"}'
        body.append(
            f'<tr data-round="{_e(s["round"])}"{css}>'
            f'<td data-col="round">{_e(s["round"])}</td>'
            f'<td data-col="run_id" class="text">{_e(s["run_id"] or "-")}</td>'
            f'<td data-col="loss_before">{fmt(s["loss_before"], "{:.4f}")}</td>'
            f'<td data-col="loss_after">{fmt(s["loss_after"], "{:.4f}")}</td>'
            f'<td data-col="strategy" class="text">{_e(s["strategy"] or "-")}</td>'
            f'<td data-col="aggregation_s">{fmt(s["aggregation_s"])}</td>'
            f'<td data-col="decision" class="text">{_e(decision)}</td>'
            f'<td data-col="left_out" class="text">{_e(left_out)}</td></tr>'
        )
    return f'<table id="rounds"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def verification_block(problems: Sequence[str] | None, *, rounds: int, files_checked: bool, files_link: str | None) -> str:
    """OK, or FAIL with every problem (each names its round folder); None: not checked."""
    what = "manifest chain and output files" if files_checked else "manifest chain"
    if problems is None:
        return '<div id="verification" class="verification fail">FAIL: the campaign folder cannot be read</div>'
    if problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in problems)
        status = f'<div id="verification" class="verification fail">FAIL {_e(what)}: {len(problems)} problem(s)</div>'
        status += f'<ul class="problems" id="verification-problems">{items}</ul>'
    else:
        status = f'<div id="verification" class="verification ok">OK {_e(what)}: {rounds} round(s) verified</div>'
    if files_link and not files_checked:
        status += f' <a id="verify-files" href="{_e(files_link)}">also check every output file (hashes the models)</a>'
    return status


def lineage_line(manifests: Sequence[dict[str, Any]], campaigns: Sequence[tuple[str, str]] = ()) -> str:
    """"warm-started from <campaign> round N" when round 0 records a warm start, else ""."""
    first = next((m for m in manifests if m.get("round") == 0), None) or {}
    source = first.get("warm_start")
    if not isinstance(source, dict) or not source.get("campaign"):
        return ""
    name, links = str(source["campaign"]), dict(campaigns)
    shown = f'<a href="{_e(links[name])}">{_e(name)}</a>' if name in links else _e(name)
    finished = "" if source.get("finished", True) else " (an unfinished campaign)"
    sha = _e(str(source.get("manifest_sha256") or "")[:12])
    return (f'<p id="lineage">warm-started from {shown} round {_e(source.get("round"))}{finished}'
            f' <span class="muted">(manifest sha256 {sha}…)</span></p>')  # fmt: skip


def warnings_block(manifests: Sequence[dict[str, Any]]) -> str:
    """What the latest round's config left open to a hostile facility (its manifest's ``warnings``)."""
    warnings = manifests[-1].get("warnings") if manifests else None
    if not isinstance(warnings, list) or not warnings:
        return ""
    items = "".join(f"<li>{_e(str(w)[:1000])}</li>" for w in warnings[:20])
    return f'<div id="warnings" class="warn"><strong>warning</strong><ul>{items}</ul></div>'


def render_page(
    *,
    dag_id: str,
    campaign: str,
    manifests: Sequence[dict[str, Any]],
    problems: Sequence[str] | None,
    files_checked: bool = False,
    highlight_round: int | None = None,
    campaigns: Sequence[tuple[str, str]] = (),
    files_link: str | None = None,
    release_html: str = "",
) -> str:
    """The whole page. ``campaigns`` are (name, link) of this DAG's other campaigns."""
    rows = facility_rows(manifests)
    summaries = round_summaries(manifests)
    last = summaries[-1] if summaries else None
    if last is None:
        state = "no round has finished yet"
    elif last["stop"]:
        state = f"finished after round {last['round']}: {last['reason'] or ''}"
    else:
        state = f"round {last['round']} is the latest finished; the campaign goes on"
    nav = ""
    if len(campaigns) > 1:
        links = "".join(
            f'<a href="{_e(link)}"{" class=current" if name == campaign else ""}>{_e(name)}</a>' for name, link in campaigns
        )
        nav = f"<nav>campaigns of this DAG: {links}</nav>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>campaign {_e(campaign)}</title>
<style>{STYLE}</style></head>
<body>
<h1 id="title">campaign <span id="campaign">{_e(campaign)}</span> <span class="muted">(DAG {_e(dag_id)})</span></h1>
{nav}
<p id="state">{_e(state)}</p>
{warnings_block(manifests)}
{lineage_line(manifests, campaigns)}
{verification_block(problems, rounds=len(summaries), files_checked=files_checked, files_link=files_link)}
<h2>charts</h2>
<div class="charts">{loss_chart(rows)}{timing_chart(rows)}</div>
<h2>rounds</h2>
{rounds_table(summaries, highlight_round=highlight_round)}
<h2>per round and facility</h2>
{facility_table(rows, highlight_round=highlight_round)}
{release_html}
<p class="muted">Read-only, from the round manifests under the campaign folder; the check is
<code>python -m xffl_tasks.verify</code>{" --no-files" if not files_checked else ""}.</p>
</body></html>
"""
