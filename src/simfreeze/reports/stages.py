"""Chains of transfers (the staged AlexNet paper): each stage's time and accuracy, and the last stage
against scratch.

A run's ``results.json`` holds its source's results under ``source``, which hold that stage's own
source, and so on: the chain is read back from there. Pure functions; the sweep's documents show
their text (``simfreeze.reports.documents``).
"""

from __future__ import annotations

import statistics
from typing import Any

from simfreeze.reports.records import finished
from simfreeze.reports.stats import mean_std, plus_minus


def chain_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of every stage of a run, first stage first, the run itself last."""
    chain = [run]
    while chain[0].get("source"):
        chain.insert(0, chain[0]["source"])
    return chain


def finished_chains(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The chains of the finished runs that have at least two source stages."""
    chains = (chain_of(r) for r in runs if finished(r))
    return [chain for chain in chains if len(chain) >= 3]


def stage_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage of the finished chains and per task at that stage (a study's cat and automobile
    sources are two rows): frozen layers, fit seconds and accuracies, mean ± std over the distinct
    stage runs. A stage that many chains share (one cached base) counts once, not once per chain."""
    chains = finished_chains(runs)
    if not chains:
        return []
    rows = []
    for i in range(max(map(len, chains))):
        tasks: dict[Any, dict[Any, dict[str, Any]]] = {}
        for chain in chains:
            if len(chain) > i:  # the same trained stage recurs in every chain that reused it: keyed by its folder
                stage = chain[i]
                tasks.setdefault(stage.get("name"), {})[stage.get("run_dir") or id(stage)] = stage
        for task, distinct in tasks.items():
            stage = list(distinct.values())
            rows.append({"stage": i + 1, "task": task,
                         "l_freeze": sorted({s.get("l_freeze", 0) for s in stage}), "n": len(stage),
                         "fit_seconds": mean_std([s.get("fit_seconds") for s in stage]),
                         "best_val_acc": mean_std([s.get("best_val_acc") for s in stage]),
                         "test_acc": mean_std([s.get("test_acc") for s in stage])})
    return rows


def last_stage_speedup(runs: list[dict[str, Any]], reference_arm: str = "scratch") -> dict[str, Any] | None:
    """The last stage's fit time against the same task trained from scratch: the ratio of the means,
    and the median of the per-seed ratios (runs paired by seed)."""
    staged = {chain[-1]["seed"]: chain[-1] for chain in finished_chains(runs)}
    scratch = {r["seed"]: r for r in runs if finished(r) and r.get("arm") == reference_arm}
    if not staged or not scratch:
        return None
    last, base = mean_std([r["fit_seconds"] for r in staged.values()]), mean_std([r["fit_seconds"] for r in scratch.values()])
    paired = [scratch[s]["fit_seconds"] / staged[s]["fit_seconds"] for s in staged if s in scratch]
    return {"last_seconds": last, "scratch_seconds": base, "ratio_of_means": base[0] / last[0],
            "median_ratio": statistics.median(paired) if paired else None, "pairs": len(paired),
            "last_acc": mean_std([r.get("best_val_acc") for r in staged.values()]),
            "scratch_acc": mean_std([r.get("best_val_acc") for r in scratch.values()])}


def stages_markdown(runs: list[dict[str, Any]]) -> str:
    """The stage table and the speed-up line, or "" when no run is a chain of three or more stages."""
    rows = stage_rows(runs)
    if not rows:
        return ""
    has_test = any(r["test_acc"] for r in rows)
    lines = ["| stage | task | frozen layers | n | fit s | best val acc" + (" | test acc" if has_test else "") + " |",
             "|---|---|---|---|---|---" + ("|---" if has_test else "") + "|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['task']} | {'/'.join(map(str, r['l_freeze']))} | {r['n']} | "
                     f"{plus_minus(r['fit_seconds'], 1)} | {plus_minus(r['best_val_acc'], 3)}"
                     + (f" | {plus_minus(r['test_acc'], 3)}" if has_test else "") + " |")
    speedup = last_stage_speedup(runs)
    if speedup:
        median = (f"; median of {speedup['pairs']} per-seed ratios {speedup['median_ratio']:.2f}×"
                  if speedup["median_ratio"] else "")
        lines.append(
            f"\nLast stage {plus_minus(speedup['last_seconds'], 1)} s against {plus_minus(speedup['scratch_seconds'], 1)} s "
            f"for the same task from scratch: **{speedup['ratio_of_means']:.2f}× faster** (ratio of the means"
            f"{median}); best val acc {plus_minus(speedup['last_acc'], 3)} against {plus_minus(speedup['scratch_acc'], 3)}. "
            f"The earlier stages' time is not in the last stage's: it is paid once per chain and reused from "
            f"the source cache.")
    return "\n".join(lines)
