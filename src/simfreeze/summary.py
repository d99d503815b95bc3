"""One summary per multirun: every job's ``results.json`` → mean ± std per arm over seeds.

Runs as a Hydra callback at multirun end (``hydra.callbacks.summary`` in conf/train.yaml) and
writes ``summary.csv`` (one row per job), ``summary.md`` (the table, the per-job rows, the
command) in the sweep directory, and prints the table.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

RUN_COLUMNS = ["job", "arm", "name", "seed", "S", "l_freeze", "trainable_parameters", "best_val_acc",
               "final_val_acc", "test_acc", "fit_seconds", "mean_epoch_seconds", "train_images_per_second",
               "run_dir"]


def read_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sweep_dir.glob("*/results.json"):
        run = json.loads(path.read_text())
        run["job"] = path.parent.name
        runs.append(run)
    return sorted(runs, key=lambda r: (int(r["job"]) if r["job"].isdigit() else r["job"]))


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], reference_arm: str = "scratch") -> list[dict[str, Any]]:
    """Per (arm, task) in first-seen order: seeds, S, L_freeze, parameters, accuracy and time."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run.get("arm", "?"), run["name"]), []).append(run)
    reference = mean_std([r["fit_seconds"] for (arm, _), rs in groups.items() if arm == reference_arm for r in rs])
    rows = []
    for (arm, name), members in groups.items():
        fit = mean_std([r["fit_seconds"] for r in members])
        rows.append({
            "arm": arm, "name": name, "seeds": sorted({r["seed"] for r in members}), "n": len(members),
            "S": mean_std([r.get("S") for r in members]),
            "l_freeze": sorted({r.get("l_freeze") for r in members if r.get("n_layers")}),
            "trainable_parameters": members[0].get("trainable_parameters"),
            "best_val_acc": mean_std([r.get("best_val_acc") for r in members]),
            "test_acc": mean_std([r.get("test_acc") for r in members]),
            "fit_seconds": fit,
            "time_vs_scratch": fit[0] / reference[0] if fit and reference and reference[0] else None,
        })
    return rows


def _pm(value: tuple[float, float] | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    has_test = any(r["test_acc"] for r in rows)
    header = ["arm", "task", "n", "S", "L_freeze", "trainable params", "best val acc"]
    header += ["test acc"] if has_test else []
    header += ["fit s", "time ÷ scratch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["arm"], r["name"], str(r["n"]), _pm(r["S"], 4),
                 "/".join(map(str, r["l_freeze"])) or "–", f"{r['trainable_parameters']:,}",
                 _pm(r["best_val_acc"])]
        cells += [_pm(r["test_acc"])] if has_test else []
        cells += [_pm(r["fit_seconds"], 1),
                  "–" if r["time_vs_scratch"] is None else f"{r['time_vs_scratch']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: Path, command: str = "") -> str | None:
    """Write summary.csv and summary.md for a sweep directory; returns the table (None: no runs)."""
    runs = read_runs(sweep_dir)
    if not runs:
        return None
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    table = markdown_table(summarise(runs))
    per_run = "\n".join(f"| {r['job']} | {r['arm']} | {r['seed']} | {r.get('S')} | {r.get('l_freeze')} | "
                        f"{r['best_val_acc']} | {r['fit_seconds']} |" for r in runs)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\n`{command}`\n\nMean ± std over seeds (sample std; 0 for one seed). "
        f"`time ÷ scratch`: mean fit seconds over the scratch arm's.\n\n{table}\n\n## Runs\n\n"
        f"| job | arm | seed | S | L_freeze | best val acc | fit s |\n|---|---|---|---|---|---|---|\n{per_run}\n")
    return table


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir, " ".join(["python -m train", *config.hydra.overrides.task]))
        if table:
            print(f"\n{table}\n\nsummary: {sweep_dir / 'summary.md'}", flush=True)
        else:
            print(f"no results.json under {sweep_dir}", file=sys.stderr)
