"""The campaign report: per round and facility, losses and timings, read from the manifests.

``campaign_rows`` reads the round manifests; ``render_table`` makes the text table that the
final task prints into its log; ``write_report`` also draws ``report.png`` beside the rounds.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from xffl_tasks.manifest import MANIFEST, read_manifest, round_dirs

COLUMNS = (
    ("round", "round", "{}"),
    ("facility", "facility", "{}"),
    ("status", "status", "{}"),
    ("job", "job", "{}"),
    ("queue_s", "queue s", "{:.1f}"),
    ("run_s", "run s", "{:.1f}"),
    ("push_s", "push s", "{:.2f}"),
    ("pull_s", "pull s", "{:.2f}"),
    ("moved_mb", "MB moved", "{:.3f}"),
    ("aggregation_s", "agg s", "{:.2f}"),
    ("loss_before", "loss before", "{:.4f}"),
    ("loss_after", "loss after", "{:.4f}"),
    ("samples", "samples", "{}"),
    ("epsilon", "eps", "{:.3f}"),
)


def load_manifests(campaign_dir: str | Path) -> list[dict[str, Any]]:
    manifests = []
    for _, folder in round_dirs(campaign_dir):
        manifest = read_manifest(folder / MANIFEST)
        if manifest is not None:
            manifests.append(manifest)
    return manifests


#: Numbers beyond this (or not finite) are shown as "-" and not plotted: a manifest of an older
#: version may hold any value, and neither the table nor the plot may fail on one.
MAX_SHOWN = 1e12


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    if isinstance(mapping, (int, float)) and not isinstance(mapping, bool):
        try:
            value = float(mapping)
        except OverflowError:
            return None
        return mapping if math.isfinite(value) and abs(value) <= MAX_SHOWN else None
    return mapping


def _moved_mb(facility: Any) -> float | None:
    """MB (10**6 bytes) a facility's transfers moved this round: push (and the base model's,
    in a LoRA campaign) plus pull; None when no transfer was recorded."""
    sent = [_get(facility, key, "bytes_sent") for key in ("push", "push_base", "pull")]
    sent = [value for value in sent if isinstance(value, (int, float))]
    return sum(sent) / 1e6 if sent else None


def campaign_rows(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round and facility, then one 'global' row per round (its ``aggregation_s``)."""
    rows = []
    for manifest in manifests:
        for name, facility in sorted((manifest.get("facilities") or {}).items()):
            rows.append(
                {
                    "round": manifest["round"],
                    "facility": name,
                    "status": facility.get("status"),
                    "job": _get(facility, "job", "job_id"),
                    "queue_s": _get(facility, "job", "queue_wait_s"),
                    "run_s": _get(facility, "job", "run_s"),
                    "push_s": _get(facility, "push", "seconds"),
                    "pull_s": _get(facility, "pull", "seconds"),
                    "moved_mb": _moved_mb(facility),
                    "aggregation_s": None,
                    "loss_before": _get(facility, "metrics", "val_loss_before"),
                    "loss_after": _get(facility, "metrics", "val_loss_after"),
                    "samples": _get(facility, "metrics", "num_samples"),
                    "epsilon": _get(manifest, "privacy", "facilities", name, "epsilon"),
                }
            )
        rows.append(
            {
                "round": manifest["round"],
                "facility": "(global)",
                "status": "stop" if _get(manifest, "decision", "stop") else "continue",
                "job": None,
                "queue_s": None,
                "run_s": None,
                "push_s": None,
                "pull_s": None,
                "moved_mb": sum(_moved_mb(f) or 0.0 for f in (manifest.get("facilities") or {}).values()),
                "aggregation_s": _get(manifest, "aggregation", "seconds"),
                "loss_before": _get(manifest, "weighted_val_loss"),
                "loss_after": _get(manifest, "weighted_val_loss_after"),
                "samples": sum(
                    (_get(f, "metrics", "num_samples") or 0) for f in (manifest.get("facilities") or {}).values()
                ),
                "epsilon": None,
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; the aggregation's seconds are in the global row's 'agg s' column."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = []
    for index, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i not in (1, 2) else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _write_atomic_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Losses per round (each facility and the weighted global) and time per round."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    private = any(r.get("epsilon") is not None for r in rows)
    figure, axes = plt.subplots(1, 3 if private else 2, figsize=(16 if private else 11, 4.2))
    losses, times = axes[0], axes[1]
    names = sorted({r["facility"] for r in rows})
    for name in names:
        mine = [r for r in rows if r["facility"] == name and r["loss_before"] is not None]
        if not mine:
            continue
        style = {"linewidth": 2.5, "color": "black"} if name == "(global)" else {"marker": "o"}
        label = "weighted (global model)" if name == "(global)" else name
        losses.plot([r["round"] for r in mine], [r["loss_before"] for r in mine], label=label, **style)
    losses.set_xlabel("round")
    losses.set_ylabel("validation loss of the global model received")
    losses.legend(fontsize=8)
    losses.grid(alpha=0.3)

    rounds = sorted({r["round"] for r in rows})
    parts = {"queue": "queue_s", "training": "run_s", "push": "push_s", "pull": "pull_s"}
    bottom = [0.0] * len(rounds)
    for label, key in parts.items():
        heights = []
        for rnd in rounds:
            values = [r[key] for r in rows if r["round"] == rnd and r["facility"] != "(global)" and r[key] is not None]
            heights.append(max(values) if values else 0.0)
        times.bar(rounds, heights, bottom=bottom, label=f"{label} (slowest facility)")
        bottom = [b + h for b, h in zip(bottom, heights)]
    aggregation = [next((r["aggregation_s"] or 0.0 for r in rows if r["round"] == rnd and r["facility"] == "(global)"), 0.0) for rnd in rounds]
    times.bar(rounds, aggregation, bottom=bottom, label="aggregation")
    if private:  # the privacy ledger: each facility's epsilon, cumulative
        spent = axes[2]
        for name in names:
            mine = [r for r in rows if r["facility"] == name and r.get("epsilon") is not None]
            if mine:
                spent.plot([r["round"] for r in mine], [r["epsilon"] for r in mine], marker="o", label=name)
        spent.set_xlabel("round")
        spent.set_ylabel("epsilon spent (cumulative)")
        spent.legend(fontsize=8)
        spent.grid(alpha=0.3)
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    times.set_xlabel("round")
    times.set_ylabel("seconds")
    times.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    _write_atomic_bytes(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def write_report(campaign_dir: str | Path, *, draw: bool = True) -> tuple[str, Path, Path | None]:
    """Writes ``report.txt`` and, with ``draw``, ``report.png`` in the campaign folder;
    returns the table and the two paths (None for a plot not drawn)."""
    campaign_dir = Path(campaign_dir)
    rows = campaign_rows(load_manifests(campaign_dir))
    table = render_table(rows)
    txt = campaign_dir / "report.txt"
    _write_atomic_bytes(txt, lambda tmp: Path(tmp).write_text(table + "\n"))
    if not draw:
        return table, txt, None
    png = campaign_dir / "report.png"
    plot(rows, png, title=f"campaign {campaign_dir.name}")
    return table, txt, png


def main(argv: list[str] | None = None) -> int:
    """``python -m xffl_airflow.federation.report CAMPAIGN_DIR``: the table and the plot, now."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xffl_airflow.federation.report", description=main.__doc__)
    parser.add_argument("campaign_dir")
    args = parser.parse_args(argv)
    table, txt, png = write_report(args.campaign_dir)
    print(table)
    print(f"\n{txt}\n{png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
