"""``summary.md`` and ``report.md`` of a sweep, rendered from one list of sections.

Every section is built once from the sweep's runs and rows; a document is only the choice of which
sections it shows and in which order. A section therefore reads the same in both documents, title
included: the two cannot drift apart. Pure: the caller writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simfreeze.reports.records import finished
from simfreeze.reports.stats import plus_minus, setting_of
from simfreeze.reports.study import TITLE as STUDY_TITLE


@dataclass(frozen=True)
class Section:
    key: str
    title: str | None  # None: no heading; the body reads on from the section before it
    body: str

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body}" if self.title else self.body


# Which sections each document shows, in this order; a section the sweep has no content for is
# not built, and so not shown.
SUMMARY_SECTIONS = ("command", "study", "results", "depth_verdict", "scratch", "stages", "architectures", "figure",
                    "failed_jobs", "runs")
REPORT_SECTIONS = ("command", "study", "jobs", "plans", "results", "depth_verdict", "scratch", "figure", "stages",
                   "architectures", "cost_model", "files")
DOCUMENTS = {"summary.md": ("Sweep summary", SUMMARY_SECTIONS), "report.md": ("Sweep report", REPORT_SECTIONS)}

COST_MODEL_INTRO = (
    "Layers trained for k target models: classic `50·k`, transfer `F + (50 − F)·k` with each arm's own frozen "
    "depth F (Ivanov's 45/5 paper: 45), priced at t = scratch fit seconds ÷ 50; measured: `k · scratch` against "
    "`source + k · arm` (fit seconds, mean over seeds).")


def render(title: str, sections: list[Section], shown: tuple[str, ...]) -> str:
    """A document: its title, then the sections whose keys it shows, in its order."""
    by_key = {section.key: section for section in sections}
    return "\n\n".join([f"# {title}", *(by_key[key].markdown() for key in shown if key in by_key)]) + "\n"


def render_documents(sections: list[Section]) -> dict[str, str]:
    """File name → text of every document."""
    return {name: render(title, sections, shown) for name, (title, shown) in DOCUMENTS.items()}


def results_table(rows: list[dict[str, Any]]) -> str:
    """One line per setting (``simfreeze.reports.sweep.summarise``); the failed and test columns only
    where some setting has them."""
    has_test = any(r["test_acc"] for r in rows)
    has_failed = any(r["failed"] for r in rows)
    header = ["setting", "arm", "n", *(["failed"] if has_failed else []), "S", "L_freeze", "trainable params",
              "best val acc", *(["test acc"] if has_test else []), "fit s", "time ÷ scratch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["setting"], r["arm"] or "–", str(r["n"]), *([str(r["failed"])] if has_failed else []),
                 plus_minus(r["S"], 4), "/".join(map(str, r["l_freeze"])) or "–",
                 "/".join(f"{p:,}" for p in r["trainable_parameters"]) or "–", plus_minus(r["best_val_acc"]),
                 *([plus_minus(r["test_acc"])] if has_test else []), plus_minus(r["fit_seconds"], 1),
                 "–" if r["time_vs_scratch"] is None else f"{r['time_vs_scratch']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_note(runs: list[dict[str, Any]]) -> str:
    """Which images ``test acc`` was measured on, as the runs recorded it ("" when no run was tested)."""
    tested = [r for r in runs if finished(r) and r.get("test_acc") is not None]
    if not tested:
        return ""
    named = dict.fromkeys(f"{r['test_from']} ({(r.get('images') or {}).get('test', '?')} images)"
                          for r in tested if r.get("test_from"))
    if not named:  # runs made before results.json recorded it
        return "`test acc`: the runs did not record which images they were tested on."
    return f"`test acc` is on {'; '.join(named)}."


def results_note(rows: list[dict[str, Any]], held_out: str = "") -> str:
    """What the results table's numbers are: mean ± std over seeds, or one seed's values (then said once
    here rather than as "± 0.000" in every cell); ``held_out``: where the test images came from."""
    counts = [r["n"] for r in rows if r["n"]]
    if counts and max(counts) == 1:
        what = "One seed per setting: each cell is that job's value; there is no estimate of seed noise."
    elif counts and min(counts) == 1:
        what = ("Mean ± std over seeds (sample std) of the jobs that finished; a setting with 1 seed shows its "
                "value alone.")
    else:
        what = "Mean ± std over seeds (sample std) of the jobs that finished."
    return what + " `time ÷ scratch`: mean fit seconds over the same architecture's scratch arm's." + \
        (f" {held_out}" if held_out else "")


def plans_table(rows: list[dict[str, Any]], first_trained: dict[str, str | None]) -> str:
    """S and the freeze plan per setting that has either; "" when none has."""
    planned = [r for r in rows if r["S"] is not None or r["l_freeze"]]
    if not planned:
        return ""
    lines = ["| setting | S | L_freeze | first trained layer |", "|---|---|---|---|"]
    for r in planned:
        lines.append(f"| {r['setting']} | {plus_minus(r['S'], 4)} | {'/'.join(map(str, r['l_freeze'])) or '–'} | "
                     f"{first_trained.get(r['setting']) or '–'} |")
    return "\n".join(lines)


def jobs_line(runs: list[dict[str, Any]]) -> str:
    """How many jobs ran and finished, and where: the first finished job's device, precision, revision."""
    ok = [r for r in runs if finished(r)]
    first = ok[0] if ok else {}
    return (f"{len(runs)} jobs ({len(ok)} finished, {len(runs) - len(ok)} failed); device {first.get('device')}, "
            f"precision {first.get('precision')}, git {first.get('git_revision')}.")


def failed_jobs_list(runs: list[dict[str, Any]], keys: list[str]) -> str:
    return "\n".join(f"- job {r['job']} ({setting_of(r, keys)}, seed {r.get('seed')}): {r.get('error')} — "
                     f"`{r['run_dir']}`" for r in runs if not finished(r))


def runs_table(runs: list[dict[str, Any]], keys: list[str]) -> str:
    """Every job's own numbers, as recorded (failed and killed jobs too), in the main table's formats."""
    def number(value, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    return "\n".join(["| job | status | setting | seed | S | L_freeze | best val acc | fit s |",
                      "|---|---|---|---|---|---|---|---|",
                      *(f"| {r['job']} | {r['status']} | {setting_of(r, keys)} | {number(r.get('seed'), 0)} | "
                        f"{number(r.get('S'), 4)} | {number(r.get('l_freeze'), 0)} | {number(r.get('best_val_acc'), 4)} | "
                        f"{number(r.get('fit_seconds'), 1)} |" for r in runs)])


def files_list(plot: bool, cost_model: bool, study_figures: tuple[str, ...] = ()) -> str:
    return ("`summary.md`, `summary.csv` (per setting), `runs.csv` (per job)"
            + (", `summary.png`" if plot else "") + (", `cost_model.csv`, `cost_model.png`" if cost_model else "")
            + (", `study.csv` (per pair)" + "".join(f", `{name}`" for name in study_figures) if study_figures else "")
            + ", `tensorboard/`; every job's directory holds `results.json`, `plan.json`, `split.json`.")


def sweep_sections(command: str, runs: list[dict[str, Any]], rows: list[dict[str, Any]], keys: list[str], *,
                   verdict: str = "", scratch: str = "", stages: str = "", architectures: str = "",
                   first_trained: dict[str, str | None] | None = None, plot: bool = False,
                   cost_model: str = "", study: str = "", study_figures: tuple[str, ...] = ("study.png",),
                   figures_inline: bool = False) -> list[Section]:
    """Every section the sweep has content for. ``verdict``, ``scratch``, ``stages``, ``architectures``,
    ``cost_model`` and ``study`` are the markdown of ``simfreeze.reports.depth``, ``.scratch``, ``.stages``,
    ``.architectures``, ``.cost`` and ``.study`` ("" where they do not apply; with a study, its
    ``study_figures`` were drawn, linked below it unless ``figures_inline``: the study's markdown
    links them itself, a study across regimes one per regime); ``first_trained``: the first trained layer of each setting's plan;
    ``plot``: whether ``summary.png`` was drawn."""
    plans = plans_table(rows, first_trained or {})
    failed = failed_jobs_list(runs, keys)
    candidates = [
        Section("command", None, f"```bash\n{command}\n```"),
        Section("study", STUDY_TITLE, study if figures_inline else "\n\n".join(
            [study, *(f"![best depth vs S; accuracy vs depth per pair]({name})" for name in study_figures)]))
        if study else None,
        Section("jobs", None, jobs_line(runs)),
        Section("plans", "Similarity and freeze plans", plans) if plans else None,
        Section("results", "Results", f"{results_note(rows, held_out_note(runs))}\n\n{results_table(rows)}"),
        Section("depth_verdict", None, verdict) if verdict else None,
        Section("scratch", None, scratch) if scratch else None,
        Section("figure", None, "![accuracy and fit time vs frozen layers](summary.png)") if plot else None,
        Section("stages", "Stages of the chain (the staged AlexNet paper)",
                f"Mean ± std over the chained runs (one chain per seed).\n\n{stages}") if stages else None,
        Section("architectures", "Architectures (Khotsyanovsky's comparison)", architectures) if architectures else None,
        Section("cost_model", "Cost model (Ivanov's 45/5 paper)",
                f"{COST_MODEL_INTRO}\n\n{cost_model}\n\n![cost model](cost_model.png)") if cost_model else None,
        Section("failed_jobs", "Failed jobs", failed) if failed else None,
        Section("runs", "Runs", runs_table(runs, keys)),
        Section("files", "Files", files_list(plot, bool(cost_model), study_figures if study else ())),
    ]
    return [section for section in candidates if section is not None]
