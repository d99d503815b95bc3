"""One summary per multirun: every job's ``results.json`` → mean ± std per setting over seeds.

A *setting* is what the sweep varies besides ``seed`` (``arm=dynamic``, ``freeze.l_freeze=35``,
``freeze.low=0.5 freeze.high=0.8``, …), read from each job's recorded overrides. Runs as a Hydra
callback at multirun end (``hydra.callbacks.summary`` in conf/train.yaml) and writes into the sweep
directory:

- ``summary.md``: the command, the table, the depth verdict (best fixed depth, where dynamic
  landed, among settings that start from the same model), the similarity-driven arm against
  scratch and fit times above scratch's for no more trained layers (``simfreeze.reports.scratch``),
  failed jobs, every job's row;
- ``report.md``: the document to read (command, S and the plans, the results with their figures,
  the cost model); both documents are rendered from one list of sections
  (``simfreeze.reports.documents``), and where they apply both show each stage of a chain of
  transfers against scratch (the staged AlexNet paper) and architecture × arm tables
  (Khotsyanovsky's comparison);
- in a *similarity study* (two or more source → target pairs, each with two or more fixed depths;
  ``simfreeze.reports.study``), a section "Does the rule pick the right depth?" near the top of both
  documents (per pair the best depth, the regret of the rule and the baselines, time, ρ between
  the similarity scores and the best depth), ``study.csv`` (one row per pair) and ``study.png``
  (best depth against S; accuracy against depth per pair). The depth verdict and ``summary.png``
  pool the pairs' depths and would mislead, so a study leaves them out;
- ``summary.csv`` (one row per setting, means and stds) and ``runs.csv`` (one row per job);
- ``summary.png``: accuracy and fit time against frozen layers, the measured depths as markers, dynamic marked;
- ``tensorboard/summary/``: ``summary.md`` as the text ``experiment/summary`` (first in the Text tab, before the runs' ``freeze/plan``) and every figure written
  (``summary.png``, ``cost_model.png``, ``study.png``); no scalars (a depth would read as a step),
  beside every job's run (``tensorboard/arm=dynamic/seed=0``, ``simfreeze.runs.loggers``);
- ``cost_model.{csv,png}``: the cost model of Ivanov's 45/5 paper beside measured times, when the
  sweep has a scratch arm and transfer arms.

A job that did not finish is listed with its state and makes the sweep exit with status 1 after the
summary is written: ``failed`` (its ``results.json`` says so), ``broken`` (its ``results.json`` is not
valid JSON), ``killed`` (a job directory without ``results.json``) or ``missing`` (planned in the
sweep's ``multirun.yaml`` but it has no job directory). Jobs without results take their overrides,
seed and arm from ``.hydra/overrides.yaml`` (or the sweep's plan). Re-summarise a sweep directory by
hand with ``python -m simfreeze.reports <sweep dir>``.
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

from simfreeze.reports.architectures import architecture_markdown
from simfreeze.reports.cost import cost_markdown, sweep_costs
from simfreeze.reports.depth import depth_verdict, verdict_text
from simfreeze.reports.documents import (held_out_note, render_documents, results_note, results_table,
                                         sweep_sections)
from simfreeze.reports.records import finished
from simfreeze.reports.scratch import scratch_markdown
from simfreeze.reports.stages import stages_markdown
from simfreeze.reports.stats import (architecture_of, effective_policy, mean_std, one_value, parse_override,
                                     setting_keys, setting_of, start_of)
from simfreeze.reports.regimes import analyse_regimes, regimes_csv_rows, regimes_markdown, verdict_line, write_figures
from simfreeze.reports.study import analyse_study, study_csv_rows, study_figure, study_markdown, study_verdict

RUN_COLUMNS = ["job", "status", "arm", "name", "setting", "seed", "S", "l_freeze", "trainable_parameters",
               "best_val_acc", "final_val_acc", "test_acc", "fit_seconds", "mean_epoch_seconds",
               "train_images_per_second", "precision", "device", "error", "run_dir"]


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def job_overrides(job_dir: Path) -> list[str] | None:
    """A job's overrides as Hydra recorded them in ``.hydra/overrides.yaml`` (None: absent or unreadable)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None
    except Exception:  # a truncated or garbled file: the job is still listed, without its overrides
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def unfinished(job_dir: Path, status: str, error: str, overrides: list[str] | None) -> dict[str, Any]:
    """A job without results: its seed and arm where its overrides set them."""
    run = {"status": status, "error": error, "run_dir": str(job_dir), "overrides": overrides}
    values = dict(parse_override(o) for o in overrides or [])
    if "seed" in values:
        seed = values["seed"]
        run["seed"] = int(seed) if seed.lstrip("-").isdigit() else seed
    if "arm" in values:
        run["arm"] = values["arm"]
    return run


def test_outcomes(path: Path) -> list[bool] | None:
    """Whether the run got each held-out image right (``test_predictions.json``), or None."""
    try:
        record = json.loads(path.read_text())
        return [p == l for p, l in zip(record["predicted"], record["labels"], strict=True)]
    except (OSError, ValueError, KeyError, TypeError):  # absent (runs before it, DDP) or damaged: no pairing
        return None


def read_job(job_dir: Path) -> dict[str, Any] | None:
    """One job directory's run (None: not a job directory)."""
    path = job_dir / "results.json"
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            return unfinished(job_dir, "broken", f"results.json cannot be read: {err}", job_overrides(job_dir))
        try:
            run = json.loads(text)
        except ValueError as err:  # truncated while written, or empty: the job did not finish
            reason = str(err) if text.strip() else "the file is empty"
            return unfinished(job_dir, "broken", f"results.json is not valid JSON: {reason}", job_overrides(job_dir))
        if not isinstance(run, dict):
            return unfinished(job_dir, "broken", f"results.json holds a JSON {type(run).__name__}, not a job's results",
                              job_overrides(job_dir))
        run.setdefault("status", "ok")
        run.setdefault("run_dir", str(job_dir))
        run["policy"] = effective_policy(run)
        run["test_correct"] = test_outcomes(job_dir / "test_predictions.json")
        return run
    if (job_dir / ".hydra").is_dir():
        return unfinished(job_dir, "killed", "no results.json: the job was killed or is still running",
                          job_overrides(job_dir))
    return None


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides, in job-number order, as Hydra's basic sweeper expands the sweep's
    ``multirun.yaml`` (``hydra.sweeper.params`` then ``hydra.overrides.task``); None when that cannot be
    told. ``simfreeze.runs.preflight.sweep_jobs`` needs a running Hydra (and sits a layer above), so
    this repeats its two Hydra calls without a config loader: ``a,b,c`` lists, ``range()``,
    ``choice()`` and list values with commas expand as in the sweep; ``glob()`` needs the config
    groups and gives None, as do other sweepers (Optuna, Ax choose their values while they run) and
    job directories not named by job number."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config = OmegaConf.load(multirun)
        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
            return None
        params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # an unreadable plan lists nothing extra; the jobs that ran are still summarised
        return None


def fill_from_siblings(runs: list[dict[str, Any]]) -> None:
    """A job without results takes its arm and name from a job with the same overrides but the seed
    (where the arm is not overridden, e.g. a seeds-only sweep, the arm and name are the setting)."""
    def without_seed(run):
        return tuple(sorted(o for o in run["overrides"] if parse_override(o)[0] != "seed"))

    known = {without_seed(r): r for r in runs if r.get("overrides") and r.get("arm") is not None}
    for run in runs:
        sibling = known.get(without_seed(run)) if run.get("overrides") and "arm" not in run else None
        if sibling is not None:
            run["arm"], run["name"] = sibling["arm"], sibling.get("name")


def read_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's results, by job number. A job that did not finish is listed with its state:
    ``broken`` (``results.json`` is not valid JSON), ``killed`` (a job directory without
    ``results.json``) or ``missing`` (planned in ``multirun.yaml``, no job directory)."""
    runs, folders = [], set()
    for job_dir in sweep_dir.iterdir():
        run = read_job(job_dir) if job_dir.is_dir() else None
        if job_dir.is_dir():
            folders.add(job_dir.name)
        if run is not None:
            run["job"] = job_dir.name
            runs.append(run)
    listed = {run["job"] for run in runs}
    for number, overrides in enumerate(planned_jobs(sweep_dir) or []):
        job = str(number)
        if job in listed:
            continue
        if job in folders:  # a folder without .hydra/ or results.json: set up, then killed
            run = unfinished(sweep_dir / job, "killed", "no results.json and no .hydra/: the job was killed "
                             "as it started", overrides)
        else:
            run = unfinished(sweep_dir / job, "missing", "never started (no job folder)", overrides)
        runs.append({**run, "job": job})
    fill_from_siblings(runs)
    return sorted(runs, key=lambda r: (not r["job"].isdigit(), int(r["job"]) if r["job"].isdigit() else 0, r["job"]))


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
        if finished(run) and run.get("arm") == reference_arm:
            references.setdefault(architecture_of(run), []).append(run["fit_seconds"])
    rows = []
    for setting, members in groups.items():
        ok = [r for r in members if finished(r)]
        first = (ok or members)[0]
        fit = mean_std([r["fit_seconds"] for r in ok])
        reference = mean_std(references.get(architecture_of(first), []))
        depths = [r["l_freeze"] for r in ok if r.get("n_layers")]
        rows.append({
            "setting": setting, "arm": first.get("arm"), "name": first.get("name"), "architecture": architecture_of(first),
            "start": start_of(first),
            "transfer": first.get("transfer"), "policy": first.get("policy"),
            "seeds": sorted({r["seed"] for r in ok}), "n": len(ok), "failed": len(members) - len(ok),
            "S": mean_std([r.get("S") for r in ok]),
            "l_freeze": sorted(set(depths)), "mean_l_freeze": statistics.fmean(depths) if depths else None,
            "trainable_parameters": sorted({r["trainable_parameters"] for r in ok}),  # differs where L_freeze does
            "best_val_acc": mean_std([r.get("best_val_acc") for r in ok]),
            "test_acc": mean_std([r.get("test_acc") for r in ok]),
            # what one seed's accuracy is measured on, for its sampling error, and the chance level
            "images": (ok[0].get("images") or {}) if ok else {},
            "chance": 1 / ok[0]["classes"] if ok and ok[0].get("classes") else None,
            "fit_seconds": fit, "n_layers": first.get("n_layers"),
            "source_seconds": mean_std([r["source"]["fit_seconds"] for r in ok if r.get("source")]),
            "time_vs_scratch": fit[0] / reference[0] if fit and reference and reference[0] else None,
        })
    return rows


def first_trained_layers(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, str | None]:
    """Per setting, the first trained layer of its first finished job's ``plan.json`` (None: no plan)."""
    layers: dict[str, str | None] = {}
    for run in runs:
        setting = setting_of(run, keys)
        if not finished(run) or setting in layers:
            continue
        plan = Path(run["run_dir"]) / "plan.json"
        layers[setting] = json.loads(plan.read_text()).get("first_trainable") if plan.is_file() else None
    return layers


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
            for s in stats:  # one seed: its value and no std (a 0.0 would read as no variance)
                cells += ([r[s][0], ""] if one_value(r[s]) else list(r[s])) if r[s] else ["", ""]
            writer.writerow(cells + [r["time_vs_scratch"] if r["time_vs_scratch"] is not None else ""])


def log_to_tensorboard(log_dir: Path, texts: dict[str, str], figures: dict[str, Any]) -> None:
    """The sweep's text (tag → markdown) and every figure it wrote as a file (tag → figure). No scalars: the
    depths are the x axis of the figures, and a scalar's x axis in TensorBoard reads "Step"."""
    # Imported here: torch is slow to import, and a sweep's start need not wait for it.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for tag, text in texts.items():
            writer.add_text(tag, text)
        for tag, figure in figures.items():
            writer.add_figure(tag, figure)


def write_study(sweep_dir: Path, study: dict[str, Any] | None, regimes: list[dict[str, Any]] | None
                ) -> tuple[str, str, dict[str, Any]]:
    """``study.csv`` (one row per pair, per regime in a study across regimes) and the study's figures
    (``study.png``, or one per regime); returns the study section's markdown, its verdict and the
    figures by file name."""
    rows = regimes_csv_rows(regimes, study_csv_rows) if regimes else study_csv_rows(study)
    with open(sweep_dir / "study.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    if regimes:
        return regimes_markdown(regimes), verdict_line(regimes), dict(write_figures(sweep_dir, regimes, study_figure))
    figure = study_figure(study)
    figure.savefig(sweep_dir / "study.png", dpi=120, bbox_inches="tight")
    return study_markdown(study), study_verdict(study), {"study.png": figure}


def write_cost_model(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[str, Any]:
    """The cost model of Ivanov's 45/5 paper beside the sweep's measured times (needs a scratch arm
    and a transfer arm with a measured source): ``cost_model.csv``, ``cost_model.png``; returns its
    markdown and figure ("" and None when the sweep has no such arms)."""
    from simfreeze.reports.plots import cost_figure  # matplotlib: only when there is a figure to draw

    tables, scratch_s = sweep_costs(rows)
    if not tables:
        return "", None
    with open(sweep_dir / "cost_model.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["setting", *next(iter(tables.values()))[0]])
        writer.writeheader()
        writer.writerows({"setting": setting, **row} for setting, table in tables.items() for row in table)
    figure = cost_figure(tables)
    figure.savefig(sweep_dir / "cost_model.png", dpi=120, bbox_inches="tight")
    return cost_markdown(tables, scratch_s), figure


# What a sweep's summary is about (``hydra.callbacks.summary.report``, set by each experiment): ``depth``
# (arms or depths of one task: the depth verdict and summary.png), ``study`` (two or more source → target
# pairs: simfreeze.reports.study), ``regimes`` (a study per base × target size: simfreeze.reports.regimes),
# ``architectures`` (architecture × arm); ``auto`` tells it from the results, for a user's own sweep.
REPORTS = ("auto", "depth", "study", "regimes", "architectures")


def analyses(runs: list[dict[str, Any]], report: str, architectures_md: str
             ) -> tuple[str, list[dict[str, Any]] | None, dict[str, Any] | None, str]:
    """(the report it is, the regimes, the study, a note when the declared one cannot be made)."""
    if report not in REPORTS:
        raise ValueError(f"report={report!r} is not one of {', '.join(REPORTS)}")
    if report in ("auto", "regimes"):
        regimes = analyse_regimes(runs)  # a study across regimes (bases × target sizes): each regime its own study
        if regimes is not None:
            return "regimes", regimes, None, ""
    if report in ("auto", "study", "regimes"):
        study = analyse_study(runs)
        if study is not None:
            note = "" if report != "regimes" else "The sweep's finished jobs hold one regime so far: a study of it."
            return "study", None, study, note
        if report != "auto":
            return "depth", None, None, (f"This {report} sweep has no two source → target pairs with two fixed depths "
                                         "each among its finished jobs yet: its jobs are listed as settings.")
    if report == "auto":
        return ("architectures" if architectures_md else "depth"), None, None, ""
    return report, None, None, ""


def write_summary(sweep_dir: Path, command: str = "", more: list[Path] = (), report: str = "auto"
                  ) -> dict[str, Any] | None:
    """Write the summary files of a sweep directory (``more``: other sweep directories whose jobs join
    it, e.g. a study's controls; their jobs are named ``<directory>/<job>``); ``report``: what the summary
    is about (``REPORTS``; ``auto`` tells it from the results). Returns the table and
    its note, the verdict text, the comparison with scratch, the study's verdict, the stage and
    architecture tables, the failed jobs, the depth figure's path and every figure's path (None: no jobs)."""
    from simfreeze.reports.plots import depth_figure  # matplotlib: only once the sweep has ended

    runs = read_runs(sweep_dir) + [{**run, "job": f"{other.name}/{run['job']}"} for other in more
                                   for run in read_runs(other)]
    if not runs:
        return None
    rows, keys = summarise(runs), setting_keys(runs)
    write_csvs(sweep_dir, runs, rows, keys)
    stages_md, architectures_md = stages_markdown(runs), architecture_markdown(runs)
    # Depths, the depth figure and the cost model compare layers of one architecture only; in a
    # similarity study they would also pool different pairs' depths, so its own section replaces them.
    kind, regimes, study, kind_note = analyses(runs, report, architectures_md)
    by_depth = kind == "depth"
    verdict = depth_verdict(rows) if by_depth else None
    verdict_md = verdict_text(verdict)
    figure = depth_figure(rows, verdict) if by_depth else None
    plot = sweep_dir / "summary.png" if figure is not None else None
    if figure is not None:
        figure.savefig(plot, dpi=120, bbox_inches="tight")
    table = results_table(rows)
    study_md, study_words, study_plots = write_study(sweep_dir, study, regimes) if study or regimes else ("", "", {})
    study_md = "\n\n".join(part for part in (kind_note, study_md) if part)
    cost_md, cost_plot = write_cost_model(sweep_dir, rows) if not architectures_md else ("", None)
    # every figure written as a file is in TensorBoard too, under its own tag
    figures = {"sweep/accuracy_and_time_vs_depth": figure, "sweep/cost_model": cost_plot,
               **{"study/best_depth_vs_S" + name.removeprefix("study").removesuffix(".png").replace("-", "/"): plot
                  for name, plot in study_plots.items()}}
    scratch_md = scratch_markdown(rows)
    sections = sweep_sections(command, runs, rows, keys, verdict=verdict_md, scratch=scratch_md, stages=stages_md,
                              architectures=architectures_md, first_trained=first_trained_layers(runs, keys),
                              plot=plot is not None, cost_model=cost_md, study=study_md,
                              study_figures=tuple(study_plots), figures_inline=bool(regimes))
    documents = render_documents(sections)
    for name, text in documents.items():
        (sweep_dir / name).write_text(text)
    # beside the jobs' runs (simfreeze.runs.loggers: tensorboard/arm=dynamic/seed=0, …) as the run "summary":
    # summary.md itself, and the figures
    log_to_tensorboard(sweep_dir / "tensorboard" / "summary", {"experiment/summary": documents["summary.md"]},
                       {tag: plot for tag, plot in figures.items() if plot is not None})
    written = {"summary.png": figure, **study_plots, "cost_model.png": cost_plot}
    return {"table": table, "note": results_note(rows, held_out_note(runs)), "verdict": verdict_md, "scratch": scratch_md,
            "study": study_words, "failed": [r for r in runs if not finished(r)],
            "plot": plot, "figures": [sweep_dir / name for name, drawn in written.items() if drawn is not None],
            "stages": stages_md, "architectures": architectures_md}


def report(sweep_dir: Path, command: str, more: list[Path] = (), kind: str = "auto") -> int:
    """Write and print the summary; the exit status the sweep should end with."""
    summary = write_summary(sweep_dir, command, more, kind)
    if summary is None:
        print(f"no results.json under {sweep_dir}", file=sys.stderr)
        return 1
    # One blank line before; none between the sections, which each start with their own words.
    print(f"\n{summary['note']}\n{summary['table']}", flush=True)
    for section in ("verdict", "scratch", "study", "stages", "architectures"):
        if summary[section]:
            print(summary[section].replace("**", "").strip())
    # where to read on: the two documents, the figures, and TensorBoard (the summary's and every job's logs)
    written = ["summary.md", "report.md", *(figure.name for figure in summary["figures"])]
    print(f"in {sweep_dir}: {', '.join(written)}")
    print(f"tensorboard --logdir {sweep_dir / 'tensorboard'}", flush=True)
    for run in summary["failed"]:
        label = "STOPPED" if run["status"] == "stopped" else "FAILED"
        print(f"{label} job {run['job']}: {run.get('error')} ({run['run_dir']})", file=sys.stderr)
    if summary["failed"]:
        print(f"{len(summary['failed'])} job(s) failed; the others are summarised above", file=sys.stderr)
    return 1 if summary["failed"] else 0


def sweep_command(config) -> str:
    """The command line that ran the sweep, Hydra's own overrides (launcher, sweep dir) included."""
    hydra_overrides = [o for o in config.hydra.overrides.hydra if o != "hydra.mode=MULTIRUN"]
    return " ".join(["python -m train", *hydra_overrides, *config.hydra.overrides.task])


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends; exit 1 if a job failed.
    ``report``: what the summary is about (``REPORTS``), declared by the experiment."""

    def __init__(self, report: str = "auto") -> None:
        if report not in REPORTS:
            raise ValueError(f"hydra.callbacks.summary.report={report} is not one of {', '.join(REPORTS)}")
        self.report = report

    def on_multirun_end(self, config, **kwargs) -> None:
        status = report(Path(config.hydra.sweep.dir), sweep_command(config), kind=self.report)
        if status:
            sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simfreeze.reports", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (outputs/multirun/<date>/<time>)")
    parser.add_argument("more", type=Path, nargs="*", help="other multirun directories whose jobs join the summary, "
                        "e.g. a study's controls (the summary is written into the first)")
    parser.add_argument("--report", choices=REPORTS, help="what the summary is about (default: what the sweep's "
                        "experiment declared in its multirun.yaml, else auto: told from the results)")
    args = parser.parse_args(argv)
    multirun = args.sweep_dir / "multirun.yaml"  # Hydra's record of the sweep: its command line
    recorded = OmegaConf.load(multirun) if multirun.is_file() else None
    command = sweep_command(recorded) if recorded is not None else f"python -m simfreeze.reports {args.sweep_dir}"
    if args.more:
        command += "".join(f"\n# with the jobs of {other}" for other in args.more)
    declared = OmegaConf.select(recorded, "hydra.callbacks.summary.report", default=None) if recorded is not None else None
    return report(args.sweep_dir, command, args.more, args.report or declared or "auto")
