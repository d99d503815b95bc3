"""Khotsyanovsky's comparison shape: one row per architecture, one column per arm (accuracy; fit
seconds).

Pure functions over the jobs' results; the sweep's documents show their text when a sweep varies
``model.arch`` (``+experiment=architectures``).
"""

from __future__ import annotations

from typing import Any

from simfreeze.method.plan import NEEDS_SIMILARITY
from simfreeze.reports.records import finished
from simfreeze.reports.stats import architecture_of, mean_std, plus_minus


def architecture_cells(runs: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], list[dict]]]:
    """Architectures and arms in first-seen order, and the finished runs of each (architecture, arm)."""
    archs, arms, cells = [], [], {}
    for run in runs:
        arch, arm = architecture_of(run), run.get("arm")
        if not finished(run) or arch is None or arm is None:
            continue
        archs += [arch] if arch not in archs else []
        arms += [arm] if arm not in arms else []
        cells.setdefault((arch, arm), []).append(run)
    return archs, arms, cells


def architecture_markdown(runs: list[dict[str, Any]]) -> str:
    """Two tables (best val acc; fit seconds), mean ± std over seeds, and the dynamic arm's depth;
    "" when the runs hold fewer than two architectures."""

    archs, arms, cells = architecture_cells(runs)
    if len(archs) < 2:
        return ""

    def table(title: str, field: str, digits: int) -> list[str]:
        lines = [f"| {title} | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for arch in archs:
            values = [plus_minus(mean_std([r.get(field) for r in cells.get((arch, arm), [])]), digits) for arm in arms]
            lines.append(f"| {arch} | " + " | ".join(values) + " |")
        return lines

    depth_lines = []
    for arch in archs:
        planned = [r for arm in arms for r in cells.get((arch, arm), []) if r.get("policy") in NEEDS_SIMILARITY]
        if planned:
            frozen = sorted({r["l_freeze"] for r in planned})
            scores = mean_std([r.get("S") for r in planned])
            depth_lines.append(f"{arch}: S {plus_minus(scores, 4)} → {'/'.join(map(str, frozen))} of "
                               f"{planned[0].get('n_layers')} layers frozen")
    return "\n".join(["Best val acc (mean ± std over seeds):", "", *table("architecture", "best_val_acc", 3), "",
                      "Fit seconds (mean ± std over seeds):", "", *table("architecture", "fit_seconds", 1)]
                     + (["", "Dynamic plans: " + "; ".join(depth_lines) + "."] if depth_lines else []))
