"""The depth oracle: the best fixed depth of a sweep, and how far each dynamic setting landed from it.

Depths are compared only between settings that start from the same model (``start``: the source's
name, or the weights loaded): in ``cat_to_dog_pretrained`` ``finetune`` starts from the cat model and
``base_finetune`` from the base, so both freeze 0 layers but are not the same depth of one model.
Pure functions over the rows of ``simfreeze.reports.sweep.summarise``.
"""

from __future__ import annotations

from typing import Any

from simfreeze.method.plan import NEEDS_SIMILARITY
from simfreeze.reports.stats import plus_minus, sampling_phrase


def comparable(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished transfer settings that start from one model (``kept``), and those that start from
    another (``left_out``). The model is the similarity-driven settings' (the first one's), else the
    one most fixed depths start from (ties: the first seen)."""
    transfer = [r for r in rows if r["transfer"] and r["best_val_acc"] and r["n"]]
    if not transfer:
        return {"start": None, "kept": [], "left_out": []}
    dynamic = [r.get("start") for r in transfer if r["policy"] in NEEDS_SIMILARITY]
    fixed = [r.get("start") for r in transfer if r["policy"] not in NEEDS_SIMILARITY]
    start = dynamic[0] if dynamic else max(dict.fromkeys(fixed), key=fixed.count)
    return {"start": start, "kept": [r for r in transfer if r.get("start") == start],
            "left_out": [r for r in transfer if r.get("start") != start]}


def depth_verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best fixed depth (highest mean best val acc over the transfer runs whose depth was
    fixed, among those that start from the same model as the dynamic ones) and, for each dynamic
    setting, how far it landed from it in accuracy points (on the held-out test images where every
    compared setting has them, else best val acc: ``scored_on``) and layers; the settings left out
    as they start from another model. None with fewer than two fixed depths to compare."""
    group = comparable(rows)
    fixed = [r for r in group["kept"] if r["policy"] not in NEEDS_SIMILARITY]
    dynamic = [r for r in group["kept"] if r["policy"] in NEEDS_SIMILARITY]
    if len(fixed) < 2:
        return None
    # Chosen on validation; scored on the held-out test images where every compared setting has them (the
    # best of several val means is biased up by the choice itself), else on validation, and said so.
    best = max(fixed, key=lambda r: r["best_val_acc"][0])
    scored = "test_acc" if all(r["test_acc"] for r in fixed + dynamic) else "best_val_acc"
    means = [r[scored][0] for r in fixed]
    return {
        "best_setting": best["setting"], "best_depth": best["mean_l_freeze"], "best_acc": best["best_val_acc"],
        "scored_on": scored, "best_score": best[scored],
        "images": (best.get("images") or {}).get("test" if scored == "test_acc" else "val"), "chance": best.get("chance"),
        # how much the fixed depths differ against how much seeds move one depth: the noise floor
        "fixed_range": (min(means), max(means)), "largest_std": max(r[scored][1] for r in fixed + dynamic),
        "seeds": min(r["n"] for r in fixed + dynamic),
        "dynamic": [{"setting": r["setting"], "mean_l_freeze": r["mean_l_freeze"], "l_freeze": r["l_freeze"], "acc": r[scored],
                     "points_below_best": round(100 * (best[scored][0] - r[scored][0]), 2),
                     "layers_from_best": None if r["mean_l_freeze"] is None else round(r["mean_l_freeze"] - best["mean_l_freeze"], 1)}
                    for r in dynamic],
        "start": group["start"], "left_out": [(r["setting"], r.get("start")) for r in group["left_out"]],
    }


def verdict_text(verdict: dict[str, Any] | None) -> str:
    """The verdict in sentences (markdown bold on the numbers that matter); "" without a verdict."""
    if verdict is None:
        return ""
    on_test = verdict.get("scored_on") == "test_acc"
    metric = "test acc" if on_test else "best val acc"
    score = f"; test acc {plus_minus(verdict['best_score'])}" if on_test else ""
    lines = [f"Best fixed depth (chosen on best val acc): **{verdict['best_depth']:g}** frozen layers "
             f"({verdict['best_setting']}), best val acc {plus_minus(verdict['best_acc'])}{score}."]
    for d in verdict["dynamic"]:
        gap = d["points_below_best"]
        where = "above" if gap < 0 else "below"
        layers = d["layers_from_best"]
        offset = ("at the best depth" if layers == 0 else
                  f"{abs(layers):g} {'deeper' if layers > 0 else 'shallower'} than the best depth")
        noise = ("; " + sampling_phrase(d["acc"][0], verdict.get("images"), verdict.get("chance"), gap)
                 if verdict["seeds"] < 2 else "")
        lines.append(f"Dynamic ({d['setting']}) froze {'/'.join(map(str, d['l_freeze']))} layers, "
                     f"{offset}, and is **{abs(gap):.1f} points {where}** it in {metric} "
                     f"({plus_minus(d['acc'])}){noise}.")
    low, high = verdict["fixed_range"]
    spread = f"The fixed depths' means ({metric}) span {low:.3f}–{high:.3f} ({100 * (high - low):.1f} points); "
    if verdict["seeds"] < 2:
        lines.append(spread + "with one seed per setting there is no estimate of seed noise (add seed=0,1,2).")
    else:
        lines.append(spread + f"the largest std over seeds is {verdict['largest_std']:.3f} "
                     f"({100 * verdict['largest_std']:.1f} points): differences smaller than that are within seed noise.")
    if verdict.get("left_out"):
        than = f" than {verdict['start']}" if verdict["start"] else ""
        others = ", ".join(f"{setting} (from {start or 'no recorded model'})" for setting, start in verdict["left_out"])
        lines.append(f"Left out of this comparison, as they start from another model{than}: {others}.")
    return "\n".join(lines)
