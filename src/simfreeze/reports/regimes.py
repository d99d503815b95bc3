"""The study across regimes: when does freezing pay, and how deep?

A *regime* is one base (the deepest model of the runs' chain of sources, by its cache key) and one
target data size (training images per class). ``split_regimes`` files every run under its regime;
each regime is a similarity study of its own (``simfreeze.reports.study.analyse_study``: the best
depth chosen on validation, each setting at its learning rate chosen on validation, scored on the
held-out images), with the controls beside it: random-init ``scratch`` and the base fine-tuned on
the target directly (``base_finetune``), each at its own chosen learning rate. ``regimes_markdown``
writes the overview — per regime, the best depths, where freezing beat fine-tuning beyond noise,
the rule's regret and the controls — then each regime's own section.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from simfreeze.reports.records import finished
from simfreeze.reports.stats import mean_std, plus_minus
from simfreeze.reports.study import (CONTROLS, accuracy_of, analyse_study, chosen_rate, difference_se, image_interval,
                                     number, pair_names, study_markdown, study_verdict, table, within)

CONTROL_NAMES = {"scratch": "scratch (random init)", "base_finetune": "base → target"}


def regime_key(run: dict[str, Any]) -> tuple[str | None, int | None]:
    """(the base's cache key, training images per class): the base is the deepest stage of a chain
    of two or more (source task ← base); a run without one has None."""
    chain = run.get("source_chain") or []
    base = chain[-1]["key"] if len(chain) >= 2 else None
    size = run.get("train_per_class")
    if size is None and (run.get("images") or {}).get("train") and run.get("classes"):
        size = round(run["images"]["train"] / run["classes"])
    return base, size


def base_accuracy(runs: list[dict[str, Any]], key: str | None) -> float | None:
    """The base's held-out accuracy (else best val) as a transfer run recorded its chain of sources."""
    for run in runs:
        stage = run.get("source")
        while stage:
            if key and str(stage.get("run_dir") or "").endswith(key):
                return stage.get("test_acc") if stage.get("test_acc") is not None else stage.get("best_val_acc")
            stage = stage.get("source")
    return None


def retrained_sources(runs: list[dict[str, Any]]) -> dict[str, list[tuple]]:
    """Sources and bases whose runs recorded more than one training of the same cache entry: (best val,
    held-out) accuracy per training. Jobs carried from another machine (``simfreeze.jobs.carry``) used
    that machine's training; the unfinished ones use this machine's, which may differ (another CPU's
    arithmetic), so the report says so rather than pooling them silently."""
    seen: dict[str, set[tuple]] = {}
    for run in runs:
        stage = run.get("source") if finished(run) else None
        while stage:
            entry = Path(str(stage.get("run_dir") or "")).name
            if entry:
                seen.setdefault(entry, set()).add((stage.get("best_val_acc"), stage.get("test_acc")))
            stage = stage.get("source")
    return {entry: sorted(trainings, key=str) for entry, trainings in seen.items() if len(trainings) > 1}


def retrained_note(runs: list[dict[str, Any]]) -> str | None:
    """One sentence per source trained more than once with different results; None when there is none."""
    retrained = retrained_sources(runs)
    if not retrained:
        return None
    parts = [f"`{entry}` ({'; '.join(f'val {number(v, 4)}, held-out {number(t, 4)}' for v, t in trainings)})"
             for entry, trainings in sorted(retrained.items())]
    return ("**Trained more than once, with different results** (jobs carried from another machine used its "
            "training, the others this one's): " + ", ".join(parts) + ".")


def split_regimes(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The regimes among the finished runs, weakest base and fewest images first: each ``{"key",
    "label", "base_acc", "size", "runs"}``."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:  # a failed job recorded no regime: the summary lists it among the failed jobs
        if finished(run):
            grouped.setdefault(regime_key(run), []).append(run)
    regimes = []
    for (base, size), members in grouped.items():
        accuracy = base_accuracy(runs, base)
        base_label = "no base" if base is None else f"base {base[:6]}" if accuracy is None else f"base {accuracy:.3f}"
        regimes.append({"key": (base, size), "base_acc": accuracy, "size": size, "runs": members,
                        "label": f"{base_label} · {'?' if size is None else size} images/class"})
    return sorted(regimes, key=lambda r: (r["base_acc"] is None, r["base_acc"] or 0, r["size"] or 0))


def controls_of(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per target class and control arm: the per-seed accuracies and outcomes at the learning rate
    chosen on validation."""
    found: dict[str, dict[str, dict[Any, dict[Any, tuple]]]] = {}
    for run in runs:
        if not finished(run) or run.get("arm") not in CONTROLS:
            continue
        accuracy, _ = accuracy_of(run)
        if accuracy is None:
            continue
        val = run.get("best_val_acc") if run.get("best_val_acc") is not None else accuracy
        target = pair_names(run)[1]
        by_rate = found.setdefault(target, {}).setdefault(run["arm"], {})
        by_rate.setdefault(run.get("lr"), {})[run.get("seed")] = (accuracy, val, run.get("test_correct"))
    controls: dict[str, dict[str, dict[str, Any]]] = {}
    for target, arms in found.items():
        for arm, by_rate in arms.items():
            lr = chosen_rate({rate: [v for _, v, _ in seeds.values()] for rate, seeds in by_rate.items()})
            seeds = by_rate[lr]
            controls.setdefault(target, {})[arm] = {
                "lr": lr, "acc": [a for a, _, _ in seeds.values()],
                "correct": {s: c for s, (_, _, c) in seeds.items() if c is not None}}
    return controls


def against_controls(study: dict[str, Any], controls: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per control arm: the best depth's accuracy minus the control's, in points, per pair (with its
    interval over seeds × held-out images where both saved outcomes) and the mean over pairs."""
    result = {}
    for arm in CONTROLS:
        gaps = []
        for pair in study["pairs"]:
            control = controls.get(pair["target"], {}).get(arm)
            best = pair["arms"].get("best")
            if control is None or best is None:
                continue
            gap = 100 * (best["acc"][0] - statistics.fmean(control["acc"]))  # best["acc"]: (mean, std) over seeds
            interval = image_interval(pair.get("correct", {}).get(pair["best"]["depth"]) or {}, control["correct"])
            # beyond noise: the interval over seeds × images above 0, else beyond t × SE of the pair's seed noise
            se = difference_se(pair["noise"], best["n"], len(control["acc"]))
            beyond = interval[0] > 0 if interval is not None else (None if se is None else
                                                                   gap > 0 and not within(gap, se, pair["df"]))
            gaps.append({"pair": pair["label"], "gap": gap, "interval": interval, "beyond": beyond, "lr": control["lr"]})
        if gaps:
            result[arm] = {"pairs": gaps, "mean": mean_std([g["gap"] for g in gaps])}
    return result


def analyse_regimes(runs: list[dict[str, Any]], draws: int | None = None) -> list[dict[str, Any]] | None:
    """Every regime that is a study of its own (``analyse_study``), with its controls; None when the
    runs are all of one regime (an ordinary study, whose pairs may be pooled)."""
    regimes = split_regimes(runs)
    if len(regimes) < 2:
        return None
    analysed = []
    for regime in regimes:
        study = analyse_study(regime["runs"], **({} if draws is None else {"draws": draws}))
        if study is not None:
            for pair in study["pairs"]:  # once per pair: each comparison bootstraps over images
                pair["versus_finetune"] = frozen_against_finetune(pair)
            controls = controls_of(regime["runs"])
            analysed.append({**regime, "study": study, "controls": controls,
                             "versus_controls": against_controls(study, controls)})
    return analysed


# --- words and tables ----------------------------------------------------------------------------

def frozen_against_finetune(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """Each setting of the pair chosen without the held-out images that freezes layers — the best fixed depth
    (chosen on validation) when it is not 0, and the rule when its depth is not 0 — against fine-tuning
    everything: the gap in points with its 95 % interval over seeds × held-out images (None without per-image
    outcomes: then the best depth falls back to its seed-noise test), and whether it is above 0 beyond noise."""
    finetune = pair.get("correct", {}).get(0) or {}
    compared = []
    best, ft = pair["best"]["depth"], pair["arms"].get("finetune")
    if best and ft is not None:
        interval = image_interval(pair.get("correct", {}).get(best) or {}, finetune)
        beyond = interval[0] > 0 if interval else (ft["regret"] > 0 and ft["within_noise"] is False)
        compared.append({"setting": f"depth {best}", "gap": ft["regret"], "interval": interval, "beyond": beyond})
    rule = pair["arms"].get("rule")
    if rule is not None and rule["depth"] and ft is not None:
        outcomes = {d["seed"]: d["correct"] for d in pair["dynamic"] if d["correct"] is not None}
        interval = image_interval(outcomes, finetune)
        compared.append({"setting": f"the rule at {rule['depth']:g} layers", "gap": ft["regret"] - rule["regret"],
                         "interval": interval, "beyond": bool(interval and interval[0] > 0)})
    return compared


def freezing_pays(study: dict[str, Any]) -> list[str]:
    """The pairs where a frozen setting (the best fixed depth, or the rule) beat fine-tuning beyond noise,
    each with the setting and its gap."""
    return [f"{p['label']} ({c['setting']}: {c['gap']:+.1f} [{c['interval'][0]:+.1f}, {c['interval'][1]:+.1f}])"
            if c["interval"] else f"{p['label']} ({c['setting']}: {c['gap']:+.1f})"
            for p in study["pairs"] for c in p["versus_finetune"] if c["beyond"]]


def comparisons(study: dict[str, Any]) -> int:
    return sum(len(p["versus_finetune"]) for p in study["pairs"])


def gap_cell(versus: dict[str, Any] | None) -> str:
    if versus is None:
        return "–"
    beyond = sum(1 for g in versus["pairs"] if g["beyond"])
    return f"{plus_minus(versus['mean'], 1)} ({beyond} of {len(versus['pairs'])} above it beyond noise)"


def overview_table(regimes: list[dict[str, Any]]) -> str:
    rows = []
    for regime in regimes:
        study = regime["study"]
        rule, finetune = study["arms"].get("rule"), study["arms"].get("finetune")
        rule_beyond = sum(1 for p in study["pairs"] if (a := p["arms"].get("rule")) and a["within_noise"] is False)
        rows.append([regime["label"], str(len(study["pairs"])),
                     ", ".join(str(p["best"]["depth"]) for p in study["pairs"]),
                     f"{sum(1 for p in study['pairs'] if any(c['beyond'] for c in p['versus_finetune']))} of "
                     f"{len(study['pairs'])}",
                     "–" if rule is None else f"{plus_minus(rule['regret'], 1)} ({rule_beyond} of "
                                              f"{len(study['pairs'])} beyond noise)",
                     "–" if finetune is None else plus_minus(finetune["regret"], 1),
                     *(gap_cell(regime["versus_controls"].get(arm)) for arm in CONTROLS)])
    return table(["regime", "pairs", "best depth per pair", "pairs where freezing (best depth or rule) beats fine-tuning beyond noise",
                  "rule's regret (points)", "fine-tune's regret", *(f"best − {CONTROL_NAMES[a]}" for a in CONTROLS)],
                 rows)


def regimes_verdict(regimes: list[dict[str, Any]]) -> str:
    """Where freezing pays, in words the numbers carry."""
    paying = [(r["label"], freezing_pays(r["study"])) for r in regimes]
    total = sum(len(r["study"]["pairs"]) for r in regimes)
    tests = sum(comparisons(r["study"]) for r in regimes)
    hits = [f"{label}: {', '.join(pairs)}" for label, pairs in paying if pairs]
    if not hits:
        head = (f"**Freezing paid nowhere the study looked**: in none of the {total} pairs × regimes did a frozen "
                f"setting (the best fixed depth chosen on validation, or the rule) beat fine-tuning everything beyond "
                f"noise ({tests} comparisons, {len(regimes)} regimes).")
    else:
        pairs = sum(1 for r in regimes for p in r["study"]["pairs"] if any(c["beyond"] for c in p["versus_finetune"]))
        head = (f"**A frozen setting beat fine-tuning beyond noise in {pairs} of {total} pairs × regimes** — {'; '.join(hits)} (points on held-out images, 95 % intervals over seeds × "
                f"images; {tests} comparisons, each at the 95 % level, uncorrected: by chance alone about "
                f"{0.025 * tests:.1f} would).")
    rules = [f"{r['label']}: {number(r['study']['arms']['rule']['regret'][0])}" for r in regimes
             if r["study"]["arms"].get("rule")]
    rule_line = f"The rule's regret against the best depth, points, per regime: {'; '.join(rules)}." if rules else ""
    return "\n".join(line for line in (head, rule_line) if line)


def controls_sentence(regime: dict[str, Any]) -> str:
    parts = []
    for arm in CONTROLS:
        versus = regime["versus_controls"].get(arm)
        if versus is not None:
            mean, std = versus["mean"]
            beyond = sum(1 for g in versus["pairs"] if g["beyond"])
            parts.append(f"{CONTROL_NAMES[arm]} by {mean:+.1f} ± {std:.1f} points over {len(versus['pairs'])} pairs "
                         f"(at learning rate {versus['pairs'][0]['lr']:g}; above it beyond noise in {beyond})")
    return f"The best depth from each source against the controls: {'; '.join(parts)}." if parts else \
        "No control arm (scratch, base_finetune) was run in this regime."


def settings_cost(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting measured in all the regime's pairs (each fixed depth, and the rule): the mean
    over pairs of its held-out accuracy and fit seconds, the learning rates validation chose for it,
    and whether it is on the Pareto front (no other setting is both as accurate and faster)."""
    pairs = study["pairs"]
    common = set.intersection(*(set(p["fixed"]) for p in pairs)) if pairs else set()
    settings = []
    for depth in sorted(common):
        slots = [p["fixed"][depth] for p in pairs]
        seconds = [statistics.fmean(v for v in slot["seconds"].values() if v is not None) for slot in slots
                   if any(v is not None for v in slot["seconds"].values())]
        settings.append({"setting": f"depth {depth}", "acc": statistics.fmean(statistics.fmean(s["acc"].values())
                                                                            for s in slots),
                         "seconds": statistics.fmean(seconds) if len(seconds) == len(slots) else None,
                         "lrs": sorted({s["lr"] for s in slots}, key=lambda lr: lr or 0)})
    if pairs and all(p["dynamic"] for p in pairs):
        seconds = [d["seconds"] for p in pairs for d in p["dynamic"]]
        settings.append({"setting": "rule", "acc": statistics.fmean(statistics.fmean(d["acc"] for d in p["dynamic"])
                                                                    for p in pairs),
                         "seconds": None if None in seconds else statistics.fmean(seconds),
                         "lrs": sorted({p["rule_lr"] for p in pairs}, key=lambda lr: lr or 0)})
    timed = [s for s in settings if s["seconds"] is not None]
    for setting in settings:  # dominated: another is as accurate and as fast, and better in one of the two
        setting["front"] = setting in timed and not any(
            o["acc"] >= setting["acc"] and o["seconds"] <= setting["seconds"]
            and (o["acc"], o["seconds"]) != (setting["acc"], setting["seconds"]) for o in timed)
    return settings


def cost_table(study: dict[str, Any]) -> str:
    rows = [[s["setting"], f"{s['acc']:.3f}", number(s["seconds"]), ", ".join(f"{lr:g}" if lr else "?" for lr in s["lrs"]),
             "yes" if s["front"] else ""] for s in settings_cost(study)]
    return table(["setting", "held-out accuracy, mean over pairs", "fit seconds", "learning rate(s) chosen",
                  "on the Pareto front"], rows)


def regimes_markdown(regimes: list[dict[str, Any]]) -> str:
    sections = [regimes_verdict(regimes),
                "Per regime (base: its held-out accuracy on its own classes; images/class: the target's training "
                "images): the best depth of each pair (chosen on validation), in how many pairs a frozen setting (that "
                "depth, or the rule) beat fine-tuning beyond noise on the held-out images, the rule's and fine-tuning's regret against "
                "the best depth (mean ± std over pairs), and the best depth against the controls:",
                overview_table(regimes)]
    retrained = retrained_note([run for regime in regimes for run in regime["runs"]])
    sections[1:1] = [retrained] if retrained else []
    for i, regime in enumerate(regimes):
        sections += [f"### {regime['label']}", controls_sentence(regime),
                     "Accuracy against fit time, every setting at the learning rate validation chose for it (a "
                     "setting is on the Pareto front when no other is both as accurate and as fast):",
                     cost_table(regime["study"]), study_markdown(regime["study"]),
                     f"![best depth vs S; accuracy vs depth per pair]({figure_name(i)})"]
    return "\n\n".join(sections)


def regimes_csv_rows(regimes: list[dict[str, Any]], study_rows) -> list[dict[str, Any]]:
    """``study.csv``'s rows of every regime, each with the regime's label, base accuracy and size first."""
    return [{"regime": r["label"], "base_acc": r["base_acc"], "train_per_class": r["size"], **row}
            for r in regimes for row in study_rows(r["study"])]


def figure_name(index: int) -> str:
    return f"study-regime{index + 1}.png"


def verdict_line(regimes: list[dict[str, Any]]) -> str:
    return "\n".join([regimes_verdict(regimes), *(f"{r['label']}: {study_verdict(r['study']).splitlines()[0]}"
                                                   for r in regimes)])


def draw_cost(axis, study: dict[str, Any]) -> None:
    """Every setting's held-out accuracy against its fit seconds (means over the regime's pairs), named,
    with the Pareto front joined: what each setting buys for its time."""
    settings = [s for s in settings_cost(study) if s["seconds"] is not None]
    front = sorted((s for s in settings if s["front"]), key=lambda s: s["seconds"])
    axis.plot([s["seconds"] for s in front], [s["acc"] for s in front], "-", color="C3", alpha=0.5,
              label="Pareto front")
    for s in settings:
        axis.plot(s["seconds"], s["acc"], "*" if s["setting"] == "rule" else "o",
                  color="C3" if s["front"] else "gray", markersize=10 if s["setting"] == "rule" else 6)
        axis.annotate(s["setting"].removeprefix("depth "), (s["seconds"], s["acc"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axis.set_xlabel("fit seconds, mean over pairs")
    axis.set_ylabel("held-out accuracy, mean over pairs")
    axis.set_title("accuracy vs fit time per setting (numbers: frozen layers; star: the rule)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")


def write_figures(sweep_dir: Path, regimes: list[dict[str, Any]], draw) -> list[tuple[str, Any]]:
    """One study figure per regime (``draw``: ``simfreeze.reports.study.study_figure``), titled with it,
    with a third panel of accuracy against fit time (``draw_cost``)."""
    written = []
    for i, regime in enumerate(regimes):
        figure = draw(regime["study"], draw_cost)
        title = figure.get_suptitle()
        figure.suptitle(f"{regime['label']}: {title}" if title else regime["label"])
        figure.savefig(sweep_dir / figure_name(i), dpi=120, bbox_inches="tight")
        written.append((figure_name(i), figure))
    return written
