"""Figures, drawn headless with matplotlib's object API (no display, no pyplot state)."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from simfreeze.freeze import NEEDS_SIMILARITY


def depth_figure(rows: list[dict[str, Any]], verdict: dict[str, Any] | None = None) -> Figure | None:
    """Best val accuracy and fit seconds against frozen layers (mean ± std over seeds).

    Transfer settings with a fixed depth form the curve; similarity-driven settings (dynamic,
    threshold) are red stars; runs that do not transfer (scratch, the source) are dashed reference
    lines. None when no setting has a layer count (e.g. only failed jobs).
    """
    placed = [r for r in rows if r["depth"] is not None and r["best_val_acc"]]
    if not placed:
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    panels = figure.subplots(1, 2, sharex=True)
    for axis, key, label in ((panels[0], "best_val_acc", "best val accuracy"), (panels[1], "fit_seconds", "fit seconds")):
        fixed = sorted((r for r in placed if r["transfer"] and r["policy"] not in NEEDS_SIMILARITY), key=lambda r: r["depth"])
        if fixed:
            axis.errorbar([r["depth"] for r in fixed], [r[key][0] for r in fixed], yerr=[r[key][1] for r in fixed],
                          marker="o", capsize=3, label="fixed depth")
        for r in placed:
            if r["transfer"] and r["policy"] in NEEDS_SIMILARITY:
                axis.errorbar([r["depth"]], [r[key][0]], yerr=[r[key][1]], marker="*", markersize=14, color="tab:red",
                              capsize=3, linestyle="none", label=r["setting"])
            elif not r["transfer"]:
                axis.axhline(r[key][0], linestyle="--", color="gray", linewidth=1)
                axis.annotate(r["setting"], (0, r[key][0]), xycoords=("axes fraction", "data"), fontsize=8,
                              color="gray", va="bottom")
        if verdict and key == "best_val_acc":
            axis.axvline(verdict["best_depth"], color="tab:green", linestyle=":", label="best fixed depth")
        axis.set_xlabel("frozen layers (L_freeze)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize=8, loc="best")
    figure.suptitle("accuracy and fit time vs frozen layers (mean ± std over seeds)")
    return figure
