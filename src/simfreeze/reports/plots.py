"""Figures, drawn headless with matplotlib's object API (no display, no pyplot state)."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from simfreeze.method.plan import NEEDS_SIMILARITY
from simfreeze.reports.depth import comparable
from simfreeze.reports.stats import binomial_se, seeds_phrase, zoomed_label


def depth_figure(rows: list[dict[str, Any]], verdict: dict[str, Any] | None = None) -> Figure | None:
    """Best val accuracy and fit seconds against frozen layers (mean ± std over seeds; one seed: the
    values, no error bars).

    Transfer settings with a fixed depth are markers at the depths measured, joined by a thin dotted
    guide (the depths between were not measured); similarity-driven settings (dynamic, threshold) are
    red stars; runs that do not transfer (scratch, the source) are dashed reference lines; transfer
    settings that start from another model than those (``simfreeze.reports.depth.comparable``) are
    grey diamonds, apart from the curve. The accuracy axis is zoomed to the data and says so; the time axis starts at 0. None when no setting
    has a layer count (e.g. only failed jobs).
    """
    placed = [r for r in rows if r["mean_l_freeze"] is not None and r["best_val_acc"]]
    if not placed:
        return None
    other_start = {id(r) for r in comparable(rows)["left_out"]}
    seeds = seeds_phrase([r["n"] for r in placed])
    spread = seeds != "1 seed per setting"  # error bars of the seeds' std where there is one to draw
    images = next((r["images"].get("val") for r in placed if (r.get("images") or {}).get("val")), None)
    chance = next((r["chance"] for r in placed if r.get("chance")), None)

    def bars(members: list[dict], key: str):
        """Seeds' std; with one seed, the 95 % binomial interval of the accuracy on the validation images."""
        if spread:
            return [r[key][1] for r in members]
        if key == "best_val_acc" and images:
            return [1.96 * binomial_se(r[key][0], images) for r in members]
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    panels = figure.subplots(1, 2, sharex=True)
    for axis, key, label in ((panels[0], "best_val_acc", "best val accuracy"), (panels[1], "fit_seconds", "fit seconds")):
        fixed = sorted((r for r in placed if r["transfer"] and r["policy"] not in NEEDS_SIMILARITY
                        and id(r) not in other_start), key=lambda r: r["mean_l_freeze"])
        if fixed:
            xs, ys = [r["mean_l_freeze"] for r in fixed], [r[key][0] for r in fixed]
            if len(fixed) > 1:
                axis.plot(xs, ys, linestyle=":", linewidth=1, color="tab:blue", alpha=0.6,
                          label="dotted: a guide only (depths between not measured)")
            axis.errorbar(xs, ys, yerr=bars(fixed, key), marker="o", linestyle="none",
                          color="tab:blue", capsize=3, label="fixed depth (measured)")
            for r in fixed:  # the arms with a name of their own (static45, head_only, finetune): which point is which
                if r.get("arm") not in (None, "depth"):
                    axis.annotate(r["arm"], (r["mean_l_freeze"], r[key][0]), textcoords="offset points",
                                  xytext=(4, 4), fontsize=8, color="tab:blue")
        references = []
        for r in placed:
            if id(r) in other_start:
                axis.errorbar([r["mean_l_freeze"]], [r[key][0]], yerr=bars([r], key), marker="D",
                              markersize=7, color="gray", markerfacecolor="none", capsize=3, linestyle="none",
                              label=f"{r['setting']} (starts from {r.get('start') or 'another model'})")
            elif r["transfer"] and r["policy"] in NEEDS_SIMILARITY:
                axis.errorbar([r["mean_l_freeze"]], [r[key][0]], yerr=bars([r], key), marker="*",
                              markersize=14, color="tab:red", capsize=3, linestyle="none", label=r["setting"])
            elif not r["transfer"] and not (key == "best_val_acc" and r.get("arm") == "source"):
                # (the source's accuracy is on its own task: not on the target's axis)
                axis.axhline(r[key][0], linestyle="--", color="gray", linewidth=1)
                references.append((r[key][0], r["setting"]))
        # labels above and below their lines in turn, the highest above: close references stay readable
        for index, (value, setting) in enumerate(sorted(references)):
            axis.annotate(setting, (0, value), xycoords=("axes fraction", "data"), fontsize=8, color="gray",
                          va="bottom" if (len(references) - 1 - index) % 2 == 0 else "top")
        if chance and key == "best_val_acc":
            axis.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.0f} %)")
        if verdict and key == "best_val_acc":
            axis.axvline(verdict["best_depth"], color="tab:green", linestyle="-.", linewidth=1, label="best fixed depth")
        axis.set_xlabel("frozen layers (L_freeze)")
        if key == "fit_seconds":
            axis.set_ylim(bottom=0)
            axis.set_ylabel(label)
        else:
            axis.set_ylabel(zoomed_label(axis, label))
        axis.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:  # below the panels, off the data
        figure.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(len(handles), 4))
    noise = ("" if spread else f": bars are the 95 % binomial interval on {images} validation images" if images
             else ": no error bars")
    figure.suptitle(f"accuracy and fit time vs frozen layers ({seeds}{noise})")
    return figure


def similarity_heatmap(matrix, names: list[str]) -> Figure:
    """The class × class cosine matrix, every cell annotated (the class-similarity paper's Fig. 1)."""
    values = [[float(v) for v in row] for row in matrix]
    off_diagonal = [v for i, row in enumerate(values) for j, v in enumerate(row) if i != j]
    figure = Figure(figsize=(1 + 0.75 * len(names), 0.75 * len(names)), layout="constrained")
    axis = figure.subplots()
    # Colour over the off-diagonal range: with post-ReLU features every S is near 1.
    image = axis.imshow(values, cmap="viridis", vmin=min(off_diagonal), vmax=max(off_diagonal))
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            axis.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                      color="white" if v < (min(off_diagonal) + max(off_diagonal)) / 2 else "black")
    figure.colorbar(image, ax=axis, label="cosine similarity of class centroids")
    axis.set_title("class similarity S (colour spans the off-diagonal range)")
    return figure


def centroid_map(coords, names: list[str], explained: list[float]) -> Figure:
    """Class centroids on their first two principal axes, labelled (the class-similarity paper's Fig. 2)."""
    figure = Figure(figsize=(6, 5), layout="constrained")
    axis = figure.subplots()
    xs, ys = [float(c[0]) for c in coords], [float(c[1]) for c in coords]
    axis.scatter(xs, ys, s=40)
    for x, y, name in zip(xs, ys, names):
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    axis.set_xlabel(f"PC 1 ({100 * explained[0]:.1f} % of variance)")
    axis.set_ylabel(f"PC 2 ({100 * explained[1]:.1f} % of variance)" if len(explained) > 1 else "PC 2")
    axis.set_title("class centroids, PCA")
    axis.grid(alpha=0.3)
    return figure


def freeze_curve(depth, l_total: int, low: float, high: float, marks: dict[str, float]) -> Figure:
    """``L_freeze`` against S (the class-similarity paper's Fig. 3): the linear rule, the threshold
    policy with its regimes shaded, and the measured pairs' S marked. ``depth(policy, S)`` gives the depth."""
    grid = [i / 400 for i in range(401)]
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axis = figure.subplots()
    for start, stop, colour, label in ((0, low, "tab:red", "S < low: fallback"), (low, high, "tab:orange", "linear"),
                                       (high, 1, "tab:green", "S ≥ high: L_total")):
        axis.axvspan(start, stop, color=colour, alpha=0.12, label=f"threshold regime: {label}")
    axis.plot(grid, [depth("linear", s) for s in grid], label="linear: round(S · L_total)")
    axis.plot(grid, [depth("threshold", s) for s in grid], linestyle="--", label=f"threshold (low {low}, high {high})")
    for name, s in marks.items():
        axis.axvline(s, color="gray", linewidth=0.6, alpha=0.6)
    if marks:  # the extremes by name; the rest as plain ticks
        for name, s in (min(marks.items(), key=lambda m: m[1]), max(marks.items(), key=lambda m: m[1])):
            axis.annotate(name, (s, l_total * 0.05), rotation=90, fontsize=7, ha="right")
    axis.set_xlabel("S (cosine similarity of centroids)")
    axis.set_ylabel("frozen layers L_freeze")
    axis.set_xlim(0, 1)
    axis.set_ylim(-1, l_total + 2)
    axis.set_title(f"freeze depth vs S (L_total = {l_total}); grey lines: the measured class pairs")
    axis.legend(fontsize=7, loc="upper left")
    return figure


def cost_figure(tables: dict[str, list[dict]]) -> Figure:
    """The cost model of Ivanov's 45/5 paper (dashed) against measured seconds (solid) for k = 1…
    target models: classic (every model from scratch) and each transfer setting (one source, then k
    targets). A setting that freezes nothing (F = 0, fine-tuning) has the classic line as its formula,
    by construction: it is drawn dashed with crosses over the classic line's wide grey band, and its
    legend entry says so. The legend sits outside the axes, off the data."""
    figure = Figure(figsize=(10, 5), layout="constrained")
    axis = figure.subplots()
    first = next(iter(tables.values()))
    ks = [r["k"] for r in first]
    axis.plot(ks, [r["measured_classic_s"] for r in first], "s-", color="black", linewidth=5, alpha=0.3,
              markersize=8, zorder=1, label="classic: k · scratch (= its formula)")
    for (setting, rows), colour in zip(tables.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        frozen = rows[0]["layers_transfer"] - (rows[1]["layers_transfer"] - rows[0]["layers_transfer"])
        axis.plot(ks, [r["measured_transfer_s"] for r in rows], "o-", color=colour, label=f"{setting}: source + k · arm")
        formula = f"{setting}: formula ({frozen} + {rows[0]['layers_transfer'] - frozen}·k) · t"
        axis.plot(ks, [r["predicted_transfer_s"] for r in rows], "x--" if frozen == 0 else "--", color=colour,
                  markersize=7, label=formula + (" = classic (F = 0)" if frozen == 0 else ""))
    axis.set_xlabel("target models k")
    axis.set_ylabel("seconds")
    axis.set_title("cost of k target models: measured (solid), Ivanov's 45/5 formula (dashed)\nevery line is linear in k")
    axis.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside right upper")
    return figure
