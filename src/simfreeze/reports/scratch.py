"""Against scratch: does the similarity-driven arm beat training from scratch (the README's question),
and which fit times are above scratch's although the arm trains no more layers (a busy machine,
not the method).

Pure functions over the rows of ``simfreeze.reports.sweep.summarise``; "" where a sweep has no
scratch arm to compare with.
"""

from __future__ import annotations

import math
from typing import Any

from simfreeze.method.plan import NEEDS_SIMILARITY
from simfreeze.reports.stats import plus_minus, sampling_phrase, t_975, welch_df

# A fit time this much above scratch's, for no more trained layers, is flagged: below it, timing noise.
SLOWER = 1.10


def scratch_rows(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The scratch setting of each architecture that has one finished."""
    found: dict[Any, dict[str, Any]] = {}
    for r in rows:
        if r["arm"] == "scratch" and r["n"] and r["best_val_acc"]:
            found.setdefault(r.get("architecture"), r)
    return found


def gap_sentence(row: dict[str, Any], scratch: dict[str, Any]) -> str:
    """One similarity-driven setting against scratch: accuracy in points, with the seed noise of the
    difference (Student's t × SE, the SE from both settings' stds, Welch's degrees of freedom) where both
    have two or more seeds, and time."""
    key = "test_acc" if row["test_acc"] and scratch["test_acc"] else "best_val_acc"
    metric = "test acc" if key == "test_acc" else "best val acc"
    ours, theirs = row[key], scratch[key]
    gap = 100 * (ours[0] - theirs[0])
    where = "the same as" if round(gap, 1) == 0 else f"{abs(gap):.1f} points {'above' if gap > 0 else 'below'}"
    if row["n"] < 2 or scratch["n"] < 2:
        images = (row.get("images") or {}).get("test" if key == "test_acc" else "val")
        noise = sampling_phrase(ours[0], images, row.get("chance"), gap)
    else:
        se = 100 * math.sqrt(ours[1] ** 2 / row["n"] + theirs[1] ** 2 / scratch["n"])
        t = t_975(welch_df(ours[1], row["n"], theirs[1], scratch["n"]))
        noise = (f"{'within' if abs(gap) <= t * se else 'beyond'} seed noise (95 % half-width of the difference = "
                 f"{t * se:.1f} points: t = {t:.2f} × SE, Welch, {row['n']} and {scratch['n']} seeds)")
    time = "" if row["time_vs_scratch"] is None else f", in {row['time_vs_scratch']:.2f}× its fit time"
    return (f"Against scratch: {row['setting']} (similarity-driven) has {metric} {plus_minus(ours)} against "
            f"scratch's {plus_minus(theirs)}, **{where}** it{time}; {noise}.")


def slow_arms(rows: list[dict[str, Any]]) -> list[str]:
    """Settings whose fit time is more than ``SLOWER`` × scratch's although they train no more parameters."""
    scratch = scratch_rows(rows)
    slow = []
    for r in rows:
        reference = scratch.get(r.get("architecture"))
        if (reference is None or r is reference or r["time_vs_scratch"] is None or r["time_vs_scratch"] <= SLOWER
                or not r["trainable_parameters"] or not reference["trainable_parameters"]):
            continue
        if max(r["trainable_parameters"]) <= max(reference["trainable_parameters"]):
            slow.append(f"{r['setting']} {r['time_vs_scratch']:.2f}× ({max(r['trainable_parameters']):,} trainable "
                        f"parameters against {max(reference['trainable_parameters']):,})")
    return slow


def scratch_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison with scratch in sentences ("" without a scratch arm)."""
    scratch = scratch_rows(rows)
    if not scratch:
        return ""
    lines = [gap_sentence(r, scratch[r.get("architecture")]) for r in rows
             if r["transfer"] and r["policy"] in NEEDS_SIMILARITY and r["n"] and r["best_val_acc"]
             and r.get("architecture") in scratch]
    slow = slow_arms(rows)
    if slow:
        lines.append(f"Fit time above scratch's (by more than {round(100 * (SLOWER - 1))} %) although the setting "
                     f"trains no more layers: {'; '.join(slow)}. That is more likely a busy machine than the method; "
                     f"time it again before reading its time ÷ scratch.")
    return "\n".join(lines)
