"""One summary per multirun: every job's ``results.json`` → mean ± std per setting over seeds.

A *setting* is what the sweep varies besides ``seed`` (``arm=dynamic``, ``freeze.depth=35``,
``freeze.low=0.5 freeze.high=0.8``, …), read from each job's recorded overrides. Runs as a Hydra
callback at multirun end (``hydra.callbacks.summary`` in conf/train.yaml) and writes into the sweep
directory:

- ``summary.md``: the table, the depth verdict (best fixed depth, where dynamic landed), failed jobs,
  every job's row, the command;
- ``summary.csv`` (one row per setting, means and stds) and ``runs.csv`` (one row per job);
- ``summary.png``: accuracy and fit time against frozen layers, dynamic marked;
- ``tensorboard/``: the table as text, the figure, and ``depth/*`` scalars with the depth as step;
- ``report.md``: the document to read (command, S and the plans, the results with their figures);
- ``cost_model.{csv,png}``: seed 001's cost model beside measured times (``simfreeze.reports.cost``), when the
  sweep has a scratch arm and transfer arms.
- in ``summary.md`` and ``report.md`` also, where they apply: each stage of a chain of transfers and
  the last stage against scratch (``simfreeze.reports.stages``, seed 004), and architecture × arm tables
  (``simfreeze.reports.architectures``, seed 003).

A failed job (its ``results.json`` says ``status: failed``; a job directory without one was killed)
is listed and makes the sweep exit with status 1 after the summary is written. Re-summarise a
sweep directory by hand with ``python -m simfreeze.summary <sweep dir>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from simfreeze.reports.depth import depth_verdict, verdict_text
from simfreeze.reports.stats import architecture_of, mean_std, plus_minus, setting_keys, setting_of


RUN_COLUMNS = ["job", "status", "arm", "name", "setting", "seed", "S", "l_freeze", "trainable_parameters",
               "best_val_acc", "final_val_acc", "test_acc", "fit_seconds", "mean_epoch_seconds",
               "train_images_per_second", "precision", "device", "error", "run_dir"]


def read_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's results; a job directory without ``results.json`` is a job that never finished."""
    runs = []
    for job_dir in sweep_dir.iterdir():
        path = job_dir / "results.json"
        if path.is_file():
            run = json.loads(path.read_text())
        elif (job_dir / ".hydra").is_dir():
            overrides = job_dir / ".hydra" / "overrides.yaml"
            run = {"status": "missing", "error": "no results.json: the job was killed or is still running",
                   "run_dir": str(job_dir),
                   "overrides": list(OmegaConf.load(overrides)) if overrides.is_file() else None}
        else:
            continue
        run["job"] = job_dir.name
        run.setdefault("status", "ok")
        runs.append(run)
    return sorted(runs, key=lambda r: (int(r["job"]) if r["job"].isdigit() else r["job"]))


def summarise(runs: list[dict[str, Any]], reference_arm: str = "scratch") -> list[dict[str, Any]]:
    """Per setting, in first-seen order: seeds, S, L_freeze, parameters, accuracy and time over the
    jobs that finished, and how many did not."""
    keys = setting_keys(runs)
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(setting_of(run, keys), []).append(run)
    # The reference is the scratch arm of the same architecture (a sweep may vary model.arch).
    references = {}
    for run in runs:
        if run["status"] == "ok" and run.get("arm") == reference_arm:
            references.setdefault(architecture_of(run), []).append(run["fit_seconds"])
    rows = []
    for setting, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        first = (ok or members)[0]
        fit = mean_std([r["fit_seconds"] for r in ok])
        reference = mean_std(references.get(architecture_of(first), []))
        depths = [r["l_freeze"] for r in ok if r.get("n_layers")]
        rows.append({
            "setting": setting, "arm": first.get("arm"), "name": first.get("name"),
            "transfer": first.get("transfer"), "policy": first.get("policy"),
            "seeds": sorted({r["seed"] for r in ok}), "n": len(ok), "failed": len(members) - len(ok),
            "S": mean_std([r.get("S") for r in ok]),
            "l_freeze": sorted(set(depths)), "depth": statistics.fmean(depths) if depths else None,
            "trainable_parameters": sorted({r["trainable_parameters"] for r in ok}),  # differs where L_freeze does
            "best_val_acc": mean_std([r.get("best_val_acc") for r in ok]),
            "test_acc": mean_std([r.get("test_acc") for r in ok]),
            "fit_seconds": fit, "n_layers": first.get("n_layers"),
            "source_seconds": mean_std([r["source"]["fit_seconds"] for r in ok if r.get("source")]),
            "time_vs_scratch": fit[0] / reference[0] if fit and reference and reference[0] else None,
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    has_test = any(r["test_acc"] for r in rows)
    has_failed = any(r["failed"] for r in rows)
    header = ["setting", "arm", "n", *(["failed"] if has_failed else []), "S", "L_freeze", "trainable params",
              "best val acc", *(["test acc"] if has_test else []), "fit s", "time ÷ scratch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["setting"], str(r["arm"]), str(r["n"]), *([str(r["failed"])] if has_failed else []),
                 plus_minus(r["S"], 4), "/".join(map(str, r["l_freeze"])) or "–",
                 "/".join(f"{p:,}" for p in r["trainable_parameters"]) or "–", plus_minus(r["best_val_acc"]),
                 *([plus_minus(r["test_acc"])] if has_test else []), plus_minus(r["fit_seconds"], 1),
                 "–" if r["time_vs_scratch"] is None else f"{r['time_vs_scratch']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csvs(sweep_dir: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]], keys: list[str]) -> None:
    with open(sweep_dir / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "setting": setting_of(r, keys)} for r in runs)
    columns = ["setting", "arm", "name", "n", "failed", "seeds", "l_freeze", "trainable_parameters"]
    stats = ["S", "best_val_acc", "test_acc", "fit_seconds"]
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns + [f"{s}_{part}" for s in stats for part in ("mean", "std")] + ["time_vs_scratch"])
        for r in rows:
            cells = [r[c] if not isinstance(r[c], list) else " ".join(map(str, r[c])) for c in columns]
            for s in stats:
                cells += list(r[s]) if r[s] else ["", ""]
            writer.writerow(cells + [r["time_vs_scratch"] if r["time_vs_scratch"] is not None else ""])


def log_to_tensorboard(log_dir: Path, table: str, verdict_md: str, rows: list[dict[str, Any]], figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from simfreeze.freeze import NEEDS_SIMILARITY

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_text("sweep/summary", f"{verdict_md}\n\n{table}")
        for r in rows:
            if r["depth"] is None or not r["best_val_acc"] or not r["transfer"]:
                continue
            group = "dynamic" if r["policy"] in NEEDS_SIMILARITY else "depth"
            step = round(r["depth"])
            writer.add_scalar(f"{group}/best_val_acc", r["best_val_acc"][0], step)
            writer.add_scalar(f"{group}/fit_seconds", r["fit_seconds"][0], step)
        if figure is not None:
            writer.add_figure("sweep/accuracy_and_time_vs_depth", figure)


def write_summary(sweep_dir: Path, command: str = "") -> dict[str, Any] | None:
    """Write the summary files of a sweep directory. Returns the table, the verdict text, the failed
    jobs and the written paths (None: no jobs)."""
    from simfreeze.reports.plots import depth_figure

    runs = read_runs(sweep_dir)
    if not runs:
        return None
    rows = summarise(runs)
    keys = setting_keys(runs)
    write_csvs(sweep_dir, runs, rows, keys)
    from simfreeze.reports.architectures import architecture_markdown
    from simfreeze.reports.stages import stages_markdown

    stages_md, architectures_md = stages_markdown(runs), architecture_markdown(runs)
    # Depths, the depth figure and the cost model compare layers of one architecture only.
    one_architecture = not architectures_md
    table, verdict = markdown_table(rows), depth_verdict(rows) if one_architecture else None
    verdict_md = verdict_text(verdict)
    failed = [r for r in runs if r["status"] != "ok"]
    figure = depth_figure(rows, verdict) if one_architecture else None
    plot = None
    if figure is not None:
        plot = sweep_dir / "summary.png"
        figure.savefig(plot, dpi=120, bbox_inches="tight")
    log_to_tensorboard(sweep_dir / "tensorboard", table, verdict_md, rows, figure)
    per_run = "\n".join(
        f"| {r['job']} | {r['status']} | {setting_of(r, keys)} | {r.get('seed')} | {r.get('S')} | {r.get('l_freeze')} | "
        f"{r.get('best_val_acc')} | {r.get('fit_seconds')} |" for r in runs)
    failures = "".join(f"- job {r['job']} ({setting_of(r, keys)}, seed {r.get('seed')}): {r.get('error')} — "
                       f"`{r['run_dir']}`\n" for r in failed)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\n`{command}`\n\nMean ± std over seeds (sample std; 0 for one seed) of the jobs that "
        f"finished. `time ÷ scratch`: mean fit seconds over the same architecture's scratch arm's.\n\n{table}\n\n"
        + (f"{verdict_md}\n\n" if verdict_md else "")
        + (f"## Stages of the chain\n\n{stages_md}\n\n" if stages_md else "")
        + (f"## Architectures\n\n{architectures_md}\n\n" if architectures_md else "")
        + ("![accuracy and fit time vs frozen layers](summary.png)\n\n" if plot else "")
        + (f"## Failed jobs\n\n{failures}\n" if failed else "")
        + f"## Runs\n\n| job | status | setting | seed | S | L_freeze | best val acc | fit s |\n"
          f"|---|---|---|---|---|---|---|---|\n{per_run}\n")
    cost = write_cost_model(sweep_dir, rows) if one_architecture else None
    write_report(sweep_dir, command, runs, keys, rows, table, verdict_md, plot, cost, stages_md, architectures_md)
    return {"table": table, "verdict": verdict_md, "failed": failed, "plot": plot, "stages": stages_md,
            "architectures": architectures_md}


def write_cost_model(sweep_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seed 001's cost model beside the sweep's measured times (needs a scratch arm and a transfer
    arm with a measured source): ``cost_model.csv``, ``cost_model.png``, and the text for the report."""
    from simfreeze.reports.cost import cost_markdown, sweep_costs
    from simfreeze.reports.plots import cost_figure

    tables, scratch_s = sweep_costs(rows)
    if not tables:
        return None
    with open(sweep_dir / "cost_model.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["setting", *next(iter(tables.values()))[0]])
        writer.writeheader()
        writer.writerows({"setting": setting, **row} for setting, table in tables.items() for row in table)
    plot = sweep_dir / "cost_model.png"
    cost_figure(tables).savefig(plot, dpi=120, bbox_inches="tight")
    return {"text": cost_markdown(tables, scratch_s), "plot": plot}


def write_report(sweep_dir: Path, command: str, runs: list[dict], keys: list[str], rows: list[dict], table: str,
                 verdict_md: str, plot: Path | None, cost: dict | None, stages_md: str = "",
                 architectures_md: str = "") -> None:
    """``report.md``: what ran, S and the plan per setting, the results with their figures, the cost model."""
    ok = [r for r in runs if r["status"] == "ok"]
    first = ok[0] if ok else {}
    lines = [f"# Sweep report\n\n```bash\n{command}\n```\n",
             f"{len(runs)} jobs ({len(ok)} finished, {len(runs) - len(ok)} failed); device {first.get('device')}, "
             f"precision {first.get('precision')}, git {first.get('git_revision')}.\n"]
    planned = [r for r in rows if r["S"] is not None or r["l_freeze"]]
    if planned:
        lines.append("## Similarity and freeze plans\n\n| setting | S (mean ± std) | L_freeze | first trained layer |\n"
                     "|---|---|---|---|")
        for r in planned:
            job = next((j for j in ok if setting_of(j, keys) == r["setting"]), None)
            plan_file = Path(job["run_dir"]) / "plan.json" if job else None
            first_trained = (json.loads(plan_file.read_text()).get("first_trainable")
                             if plan_file and plan_file.is_file() else None)
            lines.append(f"| {r['setting']} | {plus_minus(r['S'], 4)} | {'/'.join(map(str, r['l_freeze'])) or '–'} | "
                         f"{first_trained or '–'} |")
        lines.append("")
    lines += ["## Results\n", "Mean ± std over seeds.\n", table, ""]
    if verdict_md:
        lines += [verdict_md, ""]
    if plot:
        lines += ["![accuracy and fit time vs frozen layers](summary.png)\n"]
    if stages_md:
        lines += ["## Stages of the chain (seed 004)\n", "Mean ± std over the chained runs (one chain per seed).\n",
                  stages_md, ""]
    if architectures_md:
        lines += ["## Architectures (seed 003's tables)\n", architectures_md, ""]
    if cost:
        lines += ["## Cost model (seed 001)\n",
                  "Layers trained for k target models: classic `50·k`, transfer `F + (50 − F)·k` with each arm's "
                  "own frozen depth F (seed 001: 45), priced at t = scratch fit seconds ÷ 50; measured: "
                  "`k · scratch` against `source + k · arm` (fit seconds, mean over seeds).\n",
                  cost["text"], "", "![cost model](cost_model.png)\n"]
    lines += ["## Files\n", "`summary.md`, `summary.csv` (per setting), `runs.csv` (per job)"
              + (", `summary.png`" if plot else "") + (", `cost_model.csv`, `cost_model.png`" if cost else "")
              + ", `tensorboard/`; every job's directory holds `results.json`, `plan.json`, `split.json`."]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")


def report(sweep_dir: Path, command: str) -> int:
    """Write and print the summary; the exit status the sweep should end with."""
    summary = write_summary(sweep_dir, command)
    if summary is None:
        print(f"no results.json under {sweep_dir}", file=sys.stderr)
        return 1
    print(f"\n{summary['table']}\n", flush=True)
    if summary["verdict"]:
        print(summary["verdict"].replace("**", "") + "\n")
    for section in ("stages", "architectures"):
        if summary[section]:
            print(summary[section].replace("**", "") + "\n")
    print(f"summary: {sweep_dir / 'summary.md'}" + (f", plot: {summary['plot']}" if summary["plot"] else ""), flush=True)
    for run in summary["failed"]:
        print(f"FAILED job {run['job']}: {run.get('error')} ({run['run_dir']})", file=sys.stderr)
    if summary["failed"]:
        print(f"{len(summary['failed'])} job(s) failed; the others are summarised above", file=sys.stderr)
    return 1 if summary["failed"] else 0


def sweep_command(config) -> str:
    """The command line that ran the sweep, Hydra's own overrides (launcher, sweep dir) included."""
    hydra_overrides = [o for o in config.hydra.overrides.hydra if o != "hydra.mode=MULTIRUN"]
    return " ".join(["python -m train", *hydra_overrides, *config.hydra.overrides.task])


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends; exit 1 if a job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        status = report(Path(config.hydra.sweep.dir), sweep_command(config))
        if status:
            sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simfreeze.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (outputs/multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    multirun = args.sweep_dir / "multirun.yaml"  # Hydra's record of the sweep: its command line
    command = (sweep_command(OmegaConf.load(multirun)) if multirun.is_file()
               else f"python -m simfreeze.summary {args.sweep_dir}")
    return report(args.sweep_dir, command)


if __name__ == "__main__":
    sys.exit(main())
