"""The similarity study: over several source → target class pairs, does the class-similarity paper's
rule ``round(S · L_total)`` pick the right freeze depth?

A study sweep trains each pair's target at fixed depths and with the dynamic rule, over seeds. Per
pair this module finds the best fixed depth (the oracle), its spread over seeds and the seed noise;
then the regret of the rule and of the baselines (static45, head_only, finetune), their time, and
whether the similarity scores order the pairs' best depths (Spearman's ρ with a hierarchical
bootstrap interval). Pure: runs in, numbers and markdown out (matplotlib only inside
``study_figure``).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Any, Callable

from simfreeze.method.plan import NEEDS_SIMILARITY
from simfreeze.reports.records import finished
from simfreeze.reports.stats import mean_std, paired_interval, plus_minus, seeds_phrase, t_975, zoomed_label

L_TOTAL = 40  # the paper's L_total for ResNet-50; runs made before it was recorded used it
BASELINE_DEPTHS = {"static45": 45, "head_only": 49, "finetune": 0}
ARMS = ("rule", *BASELINE_DEPTHS)
CONTROLS = ("scratch", "base_finetune")  # a target's controls: no source model (simfreeze.reports.regimes)
SCORE_ORDER = ("cosine", "centred_cosine", "logme")
SCORE_NAMES = {"cosine": "S", "centred_cosine": "centred cosine", "logme": "LogME"}
DRAWS = 2000
TITLE = "Does the rule pick the right depth?"


# --- the runs, per pair ------------------------------------------------------------------------

def accuracy_of(run: dict[str, Any]) -> tuple[float | None, bool]:
    """The run's held-out test accuracy, else its best val accuracy; True when it fell back."""
    if run.get("test_acc") is not None:
        return run["test_acc"], False
    return run.get("best_val_acc"), True


def pair_names(run: dict[str, Any]) -> tuple[str, str]:
    """(source class, target class): ``source:cat`` → cat, ``depth:dog`` → dog."""
    source = (run.get("source") or {}).get("name") or "?"
    target = run.get("name") or "?"
    return source.removeprefix("source:"), target.partition(":")[2] or target


def l_total_of(run: dict[str, Any]) -> int:
    # the default only where the run did not record it: a recorded 0 stays 0
    return L_TOTAL if run.get("l_total") is None else run["l_total"]


def new_pair(source: str, target: str) -> dict[str, Any]:
    return {"label": f"{source} → {target}", "source": source, "target": target, "fixed": {}, "dynamic": [],
            "source_seconds_by_seed": {}, "cached": None, "runs": 0, "fallbacks": 0}


def add_run(pair: dict[str, Any], run: dict[str, Any], accuracy: float, fell_back: bool) -> None:
    """File one finished transfer run under its pair: at its fixed depth, learning rate and seed, or
    as a dynamic run."""
    seed, seconds, lr = run.get("seed"), run.get("fit_seconds"), run.get("lr")
    # the scored accuracy, and the best val accuracy that chooses the depth and the learning rate
    val = run.get("best_val_acc") if run.get("best_val_acc") is not None else accuracy
    if run.get("policy") in NEEDS_SIMILARITY:
        pair["dynamic"].append({"seed": seed, "depth": run["l_freeze"], "acc": accuracy, "seconds": seconds,
                                "S": run.get("S"), "scores": run.get("scores") or {}, "l_total": l_total_of(run),
                                "correct": run.get("test_correct"), "val": val, "lr": lr})
    else:
        runs = pair["fixed"].setdefault(run["l_freeze"], {}).setdefault(lr, {})
        runs.setdefault(seed, []).append((accuracy, seconds, val))
        if run.get("test_correct") is not None:  # per-image outcomes (test_predictions.json): one run per seed
            pair.setdefault("correct", {}).setdefault(run["l_freeze"], {}).setdefault(lr, {})[seed] = run["test_correct"]
    source = run.get("source") or {}
    if source.get("fit_seconds") is not None:  # one source per seed, shared by that seed's targets
        pair["source_seconds_by_seed"].setdefault(seed, source["fit_seconds"])
    # "cached" only when no run of the pair trained its source: then the source's time was paid elsewhere
    pair["cached"] = bool(source.get("cached")) and pair["cached"] is not False
    pair["runs"] += 1
    pair["fallbacks"] += fell_back


def chosen_rate(val_by_rate: dict[Any, list[float]]) -> Any:
    """The learning rate with the highest mean best val accuracy (ties: the smaller rate, which
    moves the source's weights less); a setting run at one rate keeps it."""
    return max(val_by_rate, key=lambda lr: (statistics.fmean(val_by_rate[lr]), -(lr or 0)))


def settle(pair: dict[str, Any]) -> dict[str, Any]:
    """Fixed depths ascending, each at its learning rate chosen on validation (``chosen_rate``):
    ``{"acc": {seed: mean}, "val": {seed: mean}, "seconds": {seed: mean}, "lr": rate, "rates": {rate:
    mean val}}`` (``acc`` scores, ``val`` chooses; a repeated seed averaged, not counted twice); the
    rule's runs at their own chosen rate; the pair's seeds, scores, L_total and source seconds."""
    fixed, correct = {}, {}
    for depth in sorted(pair["fixed"]):
        by_rate = pair["fixed"][depth]
        rates = {lr: [b for v in by_seed.values() for _, _, b in v] for lr, by_seed in by_rate.items()}
        lr = chosen_rate(rates)
        by_seed = by_rate[lr]
        fixed[depth] = {"acc": {s: statistics.fmean(a for a, _, _ in v) for s, v in by_seed.items()},
                        "val": {s: statistics.fmean(b for _, _, b in v) for s, v in by_seed.items()},
                        "seconds": {s: mean_or_none([t for _, t, _ in v]) for s, v in by_seed.items()},
                        "lr": lr, "rates": {r: statistics.fmean(v) for r, v in sorted(rates.items(), key=rate_order)}}
        if lr in pair.get("correct", {}).get(depth, {}):
            correct[depth] = pair["correct"][depth][lr]
    dynamic, rule_rate = pair["dynamic"], None
    if dynamic:
        rule_rate = chosen_rate({lr: [d["val"] for d in dynamic if d["lr"] == lr] for lr in {d["lr"] for d in dynamic}})
        dynamic = [d for d in dynamic if d["lr"] == rule_rate]
    seeds = sorted({s for slot in fixed.values() for s in slot["acc"]}, key=seed_order)
    l_totals = sorted({d["l_total"] for d in dynamic})
    return {**pair, "fixed": fixed, "correct": correct, "dynamic": dynamic, "rule_lr": rule_rate, "seeds": seeds,
            "scores": mean_scores(dynamic), "l_total": l_totals[0] if len(l_totals) == 1 else (l_totals or [L_TOTAL])[0],
            "source_seconds": mean_std(list(pair["source_seconds_by_seed"].values()))}


def rate_order(item) -> tuple:
    # numbers ascending; a run that recorded no rate (made before results.json had it) first
    return (item[0] is not None, item[0] or 0)


def seed_order(seed) -> tuple:
    # integers in numeric order (2 before 10), anything else after them
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def mean_or_none(values: list[float | None]) -> float | None:
    present = mean_std(values)
    return None if present is None else present[0]


def mean_scores(dynamic: list[dict[str, Any]]) -> dict[str, float]:
    """Each similarity score's mean over the pair's dynamic runs (``cosine``: the S the rule used)."""
    values: dict[str, list[float]] = {}
    for run in dynamic:
        scores = {**run["scores"], **({"cosine": run["S"]} if run["S"] is not None else {})}
        for name, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(name, []).append(float(value))
    ordered = sorted(values, key=lambda n: (SCORE_ORDER.index(n) if n in SCORE_ORDER else len(SCORE_ORDER), n))
    return {name: statistics.fmean(values[name]) for name in ordered}


def collect_pairs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every source → target pair among the finished transfer runs, in first-seen order."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        if not finished(run) or not run.get("transfer") or run.get("l_freeze") is None \
                or run.get("arm") in CONTROLS:  # the base fine-tuned directly: not from the pair's source
            continue
        accuracy, fell_back = accuracy_of(run)
        if accuracy is not None:
            names = pair_names(run)
            add_run(pairs.setdefault(names, new_pair(*names)), run, accuracy, fell_back)
    return [settle(pair) for pair in pairs.values()]


def study_pairs(runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The pairs with at least two fixed depths; None unless there are two such pairs (not a study)."""
    pairs = [p for p in collect_pairs(runs) if len(p["fixed"]) >= 2]
    return pairs if len(pairs) >= 2 else None


# --- the oracle and the noise --------------------------------------------------------------------

def seed_means(pair: dict[str, Any], seeds: list | None = None, metric: str = "acc") -> dict[int, float]:
    """Per fixed depth, the mean ``metric`` (``acc``: the scored accuracy, ``val``: best val accuracy,
    which chooses) over ``seeds`` (all of its seeds by default; a seed drawn twice counts twice, as a
    bootstrap draw needs); depths without any of those seeds are left out."""
    means = {}
    for depth, slot in pair["fixed"].items():
        values = [slot[metric][s] for s in (slot[metric] if seeds is None else seeds) if s in slot[metric]]
        if values:
            means[depth] = statistics.fmean(values)
    return means


def best_of(means: dict[int, float]) -> int | None:
    # ties go to the deeper depth: the same accuracy for less training
    return max(means, key=lambda depth: (means[depth], depth)) if means else None


def best_depth(pair: dict[str, Any]) -> dict[str, Any]:
    """The oracle: the fixed depth with the highest mean best val accuracy over seeds, and each
    seed's own best depth (over the depths that seed has, where it has at least two). Chosen on
    validation, so that its score (``arm_samples``: held-out test accuracy) is not also what chose it."""
    per_seed = [best_of(m) for m in (seed_means(pair, [s], "val") for s in pair["seeds"]) if len(m) >= 2]
    return {"depth": best_of(seed_means(pair, metric="val")), "per_seed": per_seed,
            "min": min(per_seed, default=None), "max": max(per_seed, default=None)}


def seed_noise(pair: dict[str, Any]) -> float | None:
    """Pooled std over seeds of one setting's accuracy, in points: the root of the mean of the
    per-setting sample variances (fixed depths and the dynamic runs); None with one seed."""
    variances = [statistics.variance(values) for values in setting_accuracies(pair) if len(values) >= 2]
    return 100 * math.sqrt(statistics.fmean(variances)) if variances else None


def setting_accuracies(pair: dict[str, Any]) -> list[list[float]]:
    return [*(list(slot["acc"].values()) for slot in pair["fixed"].values()), [run["acc"] for run in pair["dynamic"]]]


def noise_df(pair: dict[str, Any]) -> int:
    """The degrees of freedom of ``seed_noise``: Σ (seeds − 1) over the settings it pools."""
    return sum(len(values) - 1 for values in setting_accuracies(pair) if len(values) >= 2)


def within(gap: float, se: float | None, df: float) -> bool | None:
    """|gap| inside the 95 % interval of noise: t(df) × SE (Student's t, not 2: few seeds)."""
    return None if se is None else abs(gap) <= t_975(df) * se


def difference_se(noise: float | None, n_a: int, n_b: int) -> float | None:
    """Standard error of a difference of an n_a-seed and an n_b-seed mean (noise·√(2/n) when equal)."""
    return None if noise is None or not n_a or not n_b else noise * math.sqrt(1 / n_a + 1 / n_b)


# --- regret and time per pair --------------------------------------------------------------------

def arm_samples(pair: dict[str, Any], best: int) -> dict[str, dict[str, Any] | None]:
    """Each arm's per-seed accuracies and seconds: the best depth, the rule (the dynamic runs) and
    the baselines at their fixed depths (None where the pair did not measure that arm)."""
    def at(depth):
        slot = pair["fixed"].get(depth)
        return None if slot is None else {"acc": list(slot["acc"].values()), "seconds": list(slot["seconds"].values()),
                                          "depth": depth, "correct": pair.get("correct", {}).get(depth, {})}

    dynamic = pair["dynamic"]
    rule = {"acc": [d["acc"] for d in dynamic], "seconds": [d["seconds"] for d in dynamic],
            "depth": statistics.fmean(d["depth"] for d in dynamic)} if dynamic else None
    if rule is not None:
        rule["correct"] = {d["seed"]: d["correct"] for d in dynamic if d["correct"] is not None}
    return {"best": at(best), "rule": rule, **{arm: at(depth) for arm, depth in BASELINE_DEPTHS.items()}}


def arm_result(sample: dict[str, Any], best: dict[str, Any], noise: float | None,
               finetune_seconds: float | None, df: int = 0) -> dict[str, Any]:
    """One arm against the best depth: accuracy, regret in points (best − arm), whether that is
    within t(df) × SE of seed noise (``df``: the noise's degrees of freedom), fit seconds, and time ÷
    finetune's and seconds saved per target."""
    accuracy, seconds = mean_std(sample["acc"]), mean_std(sample["seconds"])
    regret = 100 * (statistics.fmean(best["acc"]) - accuracy[0])
    se = difference_se(noise, len(best["acc"]), len(sample["acc"]))
    timed = seconds is not None and finetune_seconds
    interval = image_interval(best.get("correct") or {}, sample.get("correct") or {})
    inside = within(regret, se, df) if interval is None else interval[0] <= 0 <= interval[1]
    return {"depth": sample["depth"], "n": len(sample["acc"]), "acc": accuracy, "seconds": seconds,
            "regret": regret, "se": se, "df": df, "interval": interval, "within_noise": inside,
            "time_ratio": seconds[0] / finetune_seconds if timed else None,
            "saved_seconds": finetune_seconds - seconds[0] if timed else None}


def image_interval(best: dict, arm: dict) -> tuple[float, float] | None:
    """The 95 % interval of best − arm in points over seeds × held-out images (``paired_interval``),
    from the seeds both have per-image outcomes of, on the same images; None without such outcomes."""
    seeds = [s for s in best if s in arm and len(best[s]) == len(arm[s])]
    if not seeds:
        return None
    _, low, high = paired_interval([best[s] for s in seeds], [arm[s] for s in seeds])
    return low, high


def nearest_measured(depth: float, measured: list[int]) -> int:
    # a tie between two measured depths goes to the deeper one, as the oracle's ties do
    return min(measured, key=lambda d: (abs(d - depth), -d))


def analyse_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair's oracle, noise and every arm's result; whether the rule's depth is nearest the best
    measured depth ("picks") and inside the seeds' range of best depths."""
    oracle, noise = best_depth(pair), seed_noise(pair)
    samples = arm_samples(pair, oracle["depth"])
    finetune = samples["finetune"] and mean_std(samples["finetune"]["seconds"])
    df = noise_df(pair)
    arms = {arm: arm_result(sample, samples["best"], noise, finetune[0] if finetune else None, df)
            for arm, sample in samples.items() if sample is not None}
    rule = arms.get("rule")
    n_seeds = len(samples["best"]["acc"])
    # the rule's depth is rarely a measured one (37 against 30, 40, …): it is judged by its nearest
    nearest = None if rule is None else nearest_measured(rule["depth"], list(pair["fixed"]))
    return {**pair, "best": oracle, "noise": noise, "df": df, "se": difference_se(noise, n_seeds, n_seeds), "arms": arms,
            "rule_depth": rule and rule["depth"], "rule_nearest": nearest,
            "depth_error": None if rule is None else rule["depth"] - oracle["depth"],
            "picks": None if rule is None else nearest == oracle["depth"],
            "in_spread": None if rule is None or oracle["min"] is None else oracle["min"] <= nearest <= oracle["max"]}


# --- over pairs ----------------------------------------------------------------------------------

def average_arm(pairs: list[dict[str, Any]], arm: str) -> dict[str, Any] | None:
    """An arm's regret over the pairs that measured it: mean ± std over pairs, and within noise when
    |mean| ≤ t × SE of the mean of the per-pair differences (√(Σ SE²) / n; t at the smallest of the
    pairs' degrees of freedom: the widest)."""
    results = [p["arms"][arm] for p in pairs if arm in p["arms"]]
    if not results:
        return None
    regret = mean_std([r["regret"] for r in results])
    ses = [r["se"] for r in results]
    se = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(ses)
    df = min(r["df"] for r in results)
    return {"arm": arm, "pairs": len(results), "regret": regret, "se": se, "df": df,
            "within_noise": within(regret[0], se, df),
            "time_ratio": mean_or_none([r["time_ratio"] for r in results]),
            "saved_seconds": mean_or_none([r["saved_seconds"] for r in results])}


def rule_versus(pairs: list[dict[str, Any]], baseline: str) -> dict[str, Any] | None:
    """The baseline's accuracy minus the rule's, in points, averaged over the pairs that have both
    (positive: the rule loses), with the SE of that mean from each pair's seed noise."""
    both = [p for p in pairs if "rule" in p["arms"] and baseline in p["arms"]]
    if not both:
        return None
    gaps = [p["arms"]["rule"]["regret"] - p["arms"][baseline]["regret"] for p in both]
    ses = [difference_se(p["noise"], p["arms"]["rule"]["n"], p["arms"][baseline]["n"]) for p in both]
    se = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(ses)
    gap = statistics.fmean(gaps)
    df = min(p["df"] for p in both)
    return {"baseline": baseline, "pairs": len(both), "gap": gap, "se": se, "df": df,
            "within_noise": within(gap, se, df)}


def average_ranks(values: list[float]) -> list[float]:
    """Ranks 1…n, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's ρ: Pearson's r of the average ranks; None when either side is constant."""
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(average_ranks(xs), average_ranks(ys))


# With fewer pairs the exact two-sided test of ρ cannot reach p < 0.05 (its smallest p is 2/n!: 0.083 at
# 4 pairs), so no correlation is claimed below it; ρ is still shown.
MIN_PAIRS = 5
EXACT_UP_TO = 7  # pairs; above it the permutation test draws PERMUTATIONS orderings instead of all n!
PERMUTATIONS = 10_000
ALPHA = 0.05


def permutation_p(xs: list[float], ys: list[float], seed: int = 0) -> float | None:
    """Two-sided p of Spearman's ρ under exchangeability: the share of orderings of ``ys`` whose |ρ|
    reaches the observed one (ties kept as they are). Exact over all n! orderings up to
    ``EXACT_UP_TO`` pairs, else ``(k + 1) / (N + 1)`` over N random ones (fixed RNG). None where ρ is."""
    observed = spearman(xs, ys)
    if observed is None:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    threshold = abs(observed) - 1e-12

    def reaches(order) -> bool:
        return abs(statistics.correlation(rx, list(order))) >= threshold
    if len(ys) <= EXACT_UP_TO:
        orders = list(itertools.permutations(ry))
        return sum(map(reaches, orders)) / len(orders)
    rng = random.Random(seed)
    hits = sum(reaches(rng.sample(ry, len(ry))) for _ in range(PERMUTATIONS))
    return (hits + 1) / (PERMUTATIONS + 1)


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values present (None stays None) for the family of all of
    them: it holds the chance of any false claim at the level, whatever their dependence."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def add_tests(rows: list[dict[str, Any]]) -> None:
    """Each correlation's exact permutation p and its Holm-adjusted p over every correlation computed
    (``family``: how many); a claim only from ``MIN_PAIRS`` pairs on."""
    for row in rows:
        row["p"] = permutation_p(*row.pop("points")) if row["rho"] is not None else None
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"], row["family"] = adjusted, sum(r["p"] is not None for r in rows)
        row["claim"] = (row["pairs"] >= MIN_PAIRS and adjusted is not None and adjusted < ALPHA)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def resampled_best_depth(pair: dict[str, Any], rng: random.Random) -> int | None:
    """The pair's best depth over its seeds drawn with replacement: the oracle's own seed noise."""
    drawn = [rng.choice(pair["seeds"]) for _ in pair["seeds"]]
    return best_of(seed_means(pair, drawn, "val"))


def freezing_loss(pair: dict[str, Any], depth: int, seeds: list | None = None) -> float | None:
    """Points lost by freezing ``depth`` layers against the pair's best depth (over ``seeds``): the
    best chosen on val, both scored on the scored accuracy (so the loss may be below 0)."""
    means, best = seed_means(pair, seeds), best_of(seed_means(pair, seeds, "val"))
    return None if depth not in means or best not in means else 100 * (means[best] - means[depth])


def resampled_freezing_loss(depth: int):
    def draw(pair: dict[str, Any], rng: random.Random) -> float | None:
        return freezing_loss(pair, depth, [rng.choice(pair["seeds"]) for _ in pair["seeds"]])
    return draw


def bootstrap_spearman(points: list[tuple[float, dict[str, Any]]], draws: int = DRAWS,
                       resampled=resampled_best_depth) -> dict[str, Any]:
    """95 % interval of ρ(score, best depth) (or of another per-pair value, ``resampled(pair, rng)``):
    pairs drawn with replacement, and inside each drawn pair its seeds, so both the choice of pairs
    and each oracle's noise show. Fixed RNG: deterministic; draws where ρ is undefined (a constant
    side) are skipped and counted."""
    rng = random.Random(0)
    values = []
    for _ in range(draws):
        drawn = [points[rng.randrange(len(points))] for _ in points]
        # a pair whose drawn seeds lack a depth (one seed's job failed there) has no value in this draw
        ys = [resampled(pair, rng) for _, pair in drawn]
        rho = None if None in ys else spearman([score for score, _ in drawn], ys)
        if rho is not None:
            values.append(rho)
    values.sort()
    return {"low": quantile(values, 0.025) if values else None, "high": quantile(values, 0.975) if values else None,
            "used": len(values), "draws": draws}


def correlations(pairs: list[dict[str, Any]], draws: int = DRAWS) -> list[dict[str, Any]]:
    """Per score present in some pair: ρ(score, best depth) over those pairs, with its interval."""
    names = list(dict.fromkeys(name for pair in pairs for name in pair["scores"]))
    rows = []
    for name in names:
        points = [(pair["scores"][name], pair) for pair in pairs if name in pair["scores"]]
        xs, ys = [score for score, _ in points], [pair["best"]["depth"] for _, pair in points]
        rho = spearman(xs, ys)
        interval = bootstrap_spearman(points, draws) if rho is not None else {"low": None, "high": None,
                                                                                "used": 0, "draws": 0}
        rows.append({"score": name, "rho": rho, "pairs": len(points), **interval, "points": (xs, ys)})
    return rows


def loss_correlations(pairs: list[dict[str, Any]], draws: int = DRAWS) -> list[dict[str, Any]]:
    """Per score and per deep fixed depth every pair measured (over half of the deepest): ρ(score,
    points lost by freezing that many layers against the best depth), with its interval. The rule's
    premise in another form: a more similar source should lose less when more of it is frozen; this
    stays defined when every pair has the same best depth."""
    common = set.intersection(*(set(p["fixed"]) for p in pairs))
    deep = sorted(d for d in common if d > max(common) / 2)
    names = list(dict.fromkeys(name for pair in pairs for name in pair["scores"]))
    rows = []
    for name in names:
        points = [(pair["scores"][name], pair) for pair in pairs if name in pair["scores"]]
        for depth in deep:
            losses = [freezing_loss(pair, depth) for _, pair in points]
            xs = [score for score, _ in points]
            rho = None if None in losses else spearman(xs, losses)
            interval = (bootstrap_spearman(points, draws, resampled_freezing_loss(depth)) if rho is not None
                        else {"low": None, "high": None, "used": 0, "draws": 0})
            rows.append({"score": name, "depth": depth, "rho": rho, "pairs": len(points), **interval,
                         "points": (xs, losses)})
    return rows


def analyse_study(runs: list[dict[str, Any]], draws: int = DRAWS) -> dict[str, Any] | None:
    """Everything the study reports; None when the runs are not a study (see ``study_pairs``)."""
    every = collect_pairs(runs)
    kept = study_pairs(runs)
    if kept is None:
        return None
    pairs = [analyse_pair(pair) for pair in kept]
    found, losses = correlations(pairs, draws), loss_correlations(pairs, draws)
    add_tests([*found, *losses])  # one family: every correlation the study computes
    noises = [p["noise"] for p in pairs if p["noise"] is not None]
    fallbacks, measured = sum(p["fallbacks"] for p in pairs), sum(p["runs"] for p in pairs)
    return {"pairs": pairs, "left_out": [p["label"] for p in every if len(p["fixed"]) < 2],
            "arms": {arm: average_arm(pairs, arm) for arm in ("best", *ARMS)},
            "versus": [v for v in (rule_versus(pairs, b) for b in BASELINE_DEPTHS) if v is not None],
            "correlations": found, "loss_correlations": losses,
            "noise": math.sqrt(statistics.fmean(n * n for n in noises)) if noises else None,
            "seeds": max(len(p["seeds"]) for p in pairs), "fallbacks": fallbacks, "measured_runs": measured,
            "l_totals": sorted({p["l_total"] for p in pairs}),
            # which images "held-out" means, as the runs recorded it (split.json's test_from)
            "test_from": list(dict.fromkeys(r["test_from"] for r in runs if finished(r)
                                            and r.get("test_acc") is not None and r.get("test_from")))}


# --- words and tables ----------------------------------------------------------------------------

def noise_note(inside: bool | None, se: float | None, df: int = 0, interval: tuple | None = None) -> str:
    if interval is not None:  # per-image outcomes: seeds and the held-out images' own sampling error
        return f"{'within' if inside else 'beyond'} noise, 95 % interval [{interval[0]:.1f}, {interval[1]:.1f}] over seeds × images"
    if inside is None:
        return "no noise estimate"
    return f"{'within' if inside else 'beyond'} seed noise, t·SE = {t_975(df) * se:.1f} (t = {t_975(df):.2f}, {df} df)"


def signed_gap(points: float) -> str:
    return f"{abs(points):.1f} points {'below' if points >= 0 else 'above'}"


def picks_sentence(study: dict[str, Any]) -> str:
    ruled = [p for p in study["pairs"] if p["picks"] is not None]
    if not ruled:
        return "No pair has a dynamic run: the rule was not measured."
    picks = sum(p["picks"] for p in ruled)
    spread = sum(bool(p["in_spread"]) for p in ruled)
    error = statistics.fmean(abs(p["depth_error"]) for p in ruled)
    return (f"**The rule picks the best depth in {picks} of {len(ruled)} pairs** (the measured depth nearest "
            f"its own is the best one; within the seeds' range of best depths in {spread}); it is "
            f"{error:.1f} layers from the best depth on average (mean |rule − best|).")


def rule_sentence(study: dict[str, Any]) -> str:
    rule = study["arms"]["rule"]
    if rule is None:
        return ""
    mean, std = rule["regret"]
    text = (f"It is **{signed_gap(mean)} the best depth** on average ({mean:.1f} ± {std:.1f} points over "
            f"{rule['pairs']} pairs, mean ± std")
    if study["noise"] is None:
        judged = [a["within_noise"] for pair in study["pairs"] if (a := pair["arms"].get("rule"))
                  and a["within_noise"] is not None]  # per pair: an interval over the held-out images
        if judged:
            return text + f"); per pair, over the held-out images, it is beyond noise in {judged.count(False)} of " \
                          f"{len(judged)}; with one seed per setting the mean has no seed-noise estimate (add seed=0,1,2)."
        return text + "); with one seed per setting there is no noise estimate, so no difference here can " \
                      "be told from seed noise (add seed=0,1,2)."
    return text + f"; seed noise ±{study['noise']:.1f} points a setting): {noise_note(rule['within_noise'], rule['se'], rule['df'])}."


def baselines_sentence(study: dict[str, Any]) -> str:
    parts = [f"{arm} {a['regret'][0]:.1f} ± {a['regret'][1]:.1f} ({noise_note(a['within_noise'], a['se'], a['df'])})"
             for arm in BASELINE_DEPTHS if (a := study["arms"][arm]) is not None]
    return f"Baselines, points below the best depth: {'; '.join(parts)}." if parts else ""


def versus_sentence(versus: dict[str, Any]) -> str:
    """The rule against one baseline, said plainly: it loses, beats or ties it, and whether beyond noise."""
    gap, name = versus["gap"], versus["baseline"]
    verb = "**loses to**" if gap > 0 else "beats" if gap < 0 else "ties with"
    return (f"The rule {verb} {name} by {abs(gap):.1f} points on average over {versus['pairs']} pairs "
            f"({noise_note(versus['within_noise'], versus['se'], versus['df'])}).")


def time_sentence(study: dict[str, Any]) -> str:
    parts = [f"{'best depth' if arm == 'best' else arm} {a['time_ratio']:.2f} (saves {a['saved_seconds']:.1f} s)"
             for arm, a in study["arms"].items() if a is not None and a["time_ratio"] is not None and arm != "finetune"]
    if not parts:
        return ""
    sources = [p["source_seconds"][0] for p in study["pairs"] if p["source_seconds"]]
    source = f"; a source costs {statistics.fmean(sources):.1f} s once per seed" if sources else ""
    return f"Time per target model, fit seconds ÷ finetune's (depth 0), mean over pairs: {', '.join(parts)}{source}."


def tested(row: dict[str, Any]) -> str:
    """The correlation's test in words: too few pairs for a claim, or its exact p and Holm's p."""
    if row["pairs"] < MIN_PAIRS:
        return (f"too few pairs for a claim (below {MIN_PAIRS} the exact test cannot reach p < {ALPHA:g}, "
                f"and every ρ of 2 pairs is ±1)")
    return (f"exact permutation p = {row['p']:.3f}, {row['p_holm']:.3f} after Holm's correction over the "
            f"{row['family']} correlations computed")


def evidence(row: dict[str, Any]) -> str:
    if not row.get("claim"):
        return "no evidence either way that higher S calls for deeper freezing"
    if row["rho"] > 0:
        return "evidence that higher S calls for deeper freezing"
    return "evidence that higher S calls for shallower freezing, against the rule"


def interval(row: dict[str, Any]) -> str:
    return "" if row["low"] is None else f" [{row['low']:.2f}, {row['high']:.2f}]"


def cosine_sentence(row: dict[str, Any]) -> str:
    if row["rho"] is None:
        return "ρ(S, best depth) is undefined: S or the best depth is the same in every pair."
    return (f"ρ(S, best depth) = {row['rho']:.2f}{interval(row)} over {row['pairs']} pairs (95 % hierarchical "
            f"bootstrap, {row['used']} of {row['draws']} draws defined); {tested(row)}: {evidence(row)}.")


def correlation_sentence(study: dict[str, Any]) -> str:
    """ρ(S, best depth) with its test in words, and the other scores' ρ beside it: no score is named
    the best predictor from point estimates (telling two ρ apart needs a test of their difference)."""
    rows = {row["score"]: row for row in study["correlations"]}
    if not rows:
        return "No pair recorded a similarity score: ρ cannot be computed."
    text = cosine_sentence(rows["cosine"]) if "cosine" in rows else ""
    others = [row for name, row in rows.items() if name != "cosine" and row["rho"] is not None]
    if others:
        parts = [f"{SCORE_NAMES.get(r['score'], r['score'])} ρ = {r['rho']:.2f}"
                 + (f" (Holm p = {r['p_holm']:.3f})" if r["pairs"] >= MIN_PAIRS else "") for r in others]
        text += (f" Other scores: {'; '.join(parts)}; none is named the better predictor from these point "
                 f"estimates.")
    return text.strip()


def loss_sentence(study: dict[str, Any]) -> str:
    """Whether the scores order how much deep freezing costs (negative ρ: the rule's premise), by the
    corrected test, not by the size of ρ."""
    rows = [r for r in study.get("loss_correlations", []) if r["rho"] is not None]
    if not rows:
        return ""
    deepest = max(r["depth"] for r in rows)
    at = {r["score"]: r for r in rows if r["depth"] == deepest}
    parts = [f"{SCORE_NAMES.get(r['score'], r['score'])} ρ = {r['rho']:.2f}{interval(r)}"
             + (f", Holm p = {r['p_holm']:.3f}" if r["pairs"] >= MIN_PAIRS else "") for r in at.values()]
    pairs = min(r["pairs"] for r in at.values())
    holding = [SCORE_NAMES.get(r["score"], r["score"]) for r in at.values() if r.get("claim") and r["rho"] < 0]
    if pairs < MIN_PAIRS:
        claim = f"{pairs} pairs are too few for a claim (at least {MIN_PAIRS})"
    elif holding:
        claim = (f"for {' and '.join(holding)} the correlation holds after Holm's correction: a more similar source "
                 f"loses less when frozen deep, as the rule assumes")
    else:
        claim = f"no score's correlation holds after Holm's correction over the {at[next(iter(at))]['family']} computed"
    return (f"Points lost by freezing {deepest} layers against the best depth, ranked against each score over "
            f"the pairs: {'; '.join(parts)}; {claim}.")


def metric_sentence(study: dict[str, Any]) -> str:
    fallbacks, runs = study["fallbacks"], study["measured_runs"]
    named = f" on {'; '.join(study['test_from'])}" if study.get("test_from") else ""
    if fallbacks == runs:
        return ("Accuracy: best val accuracy (no run recorded a held-out test accuracy), which both chooses each "
                "pair's best depth and scores it: the best of several means is biased up by the choice itself, so "
                "the regrets are upper bounds.")
    scored = f"held-out test accuracy{named}"
    if fallbacks:
        scored += f" (best val accuracy for the {fallbacks} of {runs} runs without one)"
    return f"Accuracy: each pair's best depth is chosen on best val accuracy and scored on {scored}."


def study_verdict(study: dict[str, Any]) -> str:
    """The answer in plain words: how often the rule picks the best depth, what it and each baseline
    cost against the best depth, whether the rule loses to a baseline, time, and ρ."""
    lines = [f"{picks_sentence(study)} {rule_sentence(study)}".strip(), baselines_sentence(study),
             *(versus_sentence(v) for v in study["versus"]), time_sentence(study), correlation_sentence(study),
             loss_sentence(study), metric_sentence(study)]
    if study["left_out"]:
        lines.append(f"Left out (fewer than two fixed depths): {', '.join(study['left_out'])}.")
    return "\n".join(line for line in lines if line)


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def depths_table(study: dict[str, Any]) -> str:
    """Per pair: the scores, the rule's depth, the best depth with its per-seed range, the noise."""
    names = list(dict.fromkeys(n for p in study["pairs"] for n in p["scores"]))
    rows = []
    for p in study["pairs"]:
        best = p["best"]
        spread = "" if best["min"] is None else f" [{best['min']}–{best['max']}]"
        rows.append([p["label"], str(len(p["seeds"])), *(number(p["scores"].get(n), 4) for n in names),
                     number(p["rule_depth"]), f"{best['depth']}{spread}", number(p["depth_error"]),
                     "–" if p["picks"] is None else ("yes" if p["picks"] else "no"), number(p["noise"])])
    return table(["pair", "seeds", *(SCORE_NAMES.get(n, n) for n in names), "rule depth",
                  "best depth [seeds' range]", "rule − best (layers)", "rule picks it", "seed noise (points)"], rows)


def accuracy_table(study: dict[str, Any]) -> str:
    """Per pair: every arm's accuracy (mean ± std over seeds) and regret in points, with its 95 %
    interval over seeds × held-out images where the runs saved per-image outcomes (* beyond noise:
    outside that interval, else beyond t × SE of seed noise)."""
    def cell(p, arm):
        a = p["arms"].get(arm)
        if a is None:
            return "–"
        flag = "" if arm == "best" or a["within_noise"] is not False else "*"
        interval = "" if a.get("interval") is None else f" [{a['interval'][0]:+.1f}, {a['interval'][1]:+.1f}]"
        return plus_minus(a["acc"]) + ("" if arm == "best" else f" ({a['regret']:+.1f}{interval}{flag})")

    rows = [[p["label"], *(cell(p, arm) for arm in ("best", *ARMS))] for p in study["pairs"]]
    averages = [study["arms"][arm] for arm in ARMS]
    rows.append(["mean over pairs", "–", *("–" if a is None else f"({a['regret'][0]:+.1f} ± {a['regret'][1]:.1f})"
                                          for a in averages)])
    return table(["pair", "best depth", *ARMS], rows)


def time_table(study: dict[str, Any]) -> str:
    """Per pair: every arm's fit seconds (mean ± std) and time ÷ finetune's, and the source's seconds."""
    def cell(p, arm):
        a = p["arms"].get(arm)
        if a is None or a["seconds"] is None:
            return "–"
        return plus_minus(a["seconds"], 1) + ("" if a["time_ratio"] is None else f" ({a['time_ratio']:.2f}×)")

    rows = [[p["label"], *(cell(p, arm) for arm in ("best", *ARMS)), plus_minus(p["source_seconds"], 1)
             + (" (from an earlier sweep's cache)" if p["cached"] else "")] for p in study["pairs"]]
    return table(["pair", "best depth", *ARMS, "source"], rows)


def correlation_table(study: dict[str, Any]) -> str:
    """ρ of each score with the best depth, then with the points lost by freezing each deep depth."""
    rows = [[SCORE_NAMES.get(r["score"], r["score"]), str(r["pairs"]), "best depth", number(r["rho"], 2),
             "–" if r["low"] is None else f"[{r['low']:.2f}, {r['high']:.2f}]", f"{r['used']} of {r['draws']}"]
            for r in [*study["correlations"], *study.get("loss_correlations", [])]]
    for row, r in zip(rows[len(study["correlations"]):], study.get("loss_correlations", [])):
        row[2] = f"points lost at depth {r['depth']}"
    for row, r in zip(rows, [*study["correlations"], *study.get("loss_correlations", [])]):
        row += [number(r.get("p"), 3), number(r.get("p_holm"), 3) if r["pairs"] >= MIN_PAIRS else "too few pairs"]
    return table(["score", "pairs", "ρ(score, …)", "ρ", "95 % interval", "bootstrap draws used", "exact p",
                  "Holm p"], rows)


def study_markdown(study: dict[str, Any]) -> str:
    """The study section's body: the verdict, then the tables with what they show."""
    return "\n\n".join([
        study_verdict(study),
        "The best depth is the fixed depth with the highest mean best val accuracy over seeds; the accuracies and "
        "regrets below are the held-out test accuracy where the runs recorded one, so the choice does not favour "
        "itself there (a regret may then be below 0). Regret = best depth − arm, in accuracy points; in brackets "
        "its 95 % interval over seeds × held-out images where the runs saved per-image outcomes "
        "(`test_predictions.json`: both seed noise and the test set's sampling error, paired image by image); * marks "
        "a regret beyond noise (outside that interval, else beyond Student's t × SE of seed noise).",
        depths_table(study), accuracy_table(study),
        "Fit seconds (mean ± std over seeds) and, in brackets, time ÷ finetune's:", time_table(study),
        "Spearman's ρ between each score and the best depth across pairs, and between each score and the points "
        "lost by freezing each deep depth against the best (negative: a more similar source loses less); 95 % "
        "interval from a hierarchical bootstrap (pairs, then each pair's seeds, drawn with replacement; "
        f"`random.Random(0)`); the exact permutation test's two-sided p (all orderings up to {EXACT_UP_TO} pairs, "
        f"else {PERMUTATIONS:,} random ones) and Holm's adjustment of it over every correlation in the table; no "
        f"claim from fewer than {MIN_PAIRS} pairs:",
        correlation_table(study)])


CSV_ARM_FIELDS = ("acc_mean", "acc_std", "regret", "within_noise", "seconds_mean", "time_ratio")


def study_csv_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per pair for ``study.csv``."""
    rows = []
    for p in study["pairs"]:
        row = {"pair": p["label"], "source": p["source"], "target": p["target"], "seeds": len(p["seeds"]),
               **{f"score_{n}": v for n, v in p["scores"].items()}, "rule_depth": p["rule_depth"],
               "best_depth": p["best"]["depth"], "best_depth_min": p["best"]["min"], "best_depth_max": p["best"]["max"],
               "best_depth_per_seed": " ".join(map(str, p["best"]["per_seed"])), "depth_error": p["depth_error"],
               "rule_picks_best": p["picks"], "seed_noise_points": p["noise"], "se_points": p["se"],
               "source_seconds": p["source_seconds"] and p["source_seconds"][0]}
        for arm in ("best", *ARMS):
            a = p["arms"].get(arm) or {}
            values = (a.get("acc") and a["acc"][0], a.get("acc") and a["acc"][1], a.get("regret"),
                      a.get("within_noise"), a.get("seconds") and a["seconds"][0], a.get("time_ratio"))
            row.update({f"{arm}_{field}": value for field, value in zip(CSV_ARM_FIELDS, values)})
        rows.append({key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()})
    return rows


# --- the figure ----------------------------------------------------------------------------------

def study_figure(study: dict[str, Any], extra: Callable[[Any, dict[str, Any]], None] | None = None):
    """Left: each pair's best depth (marker; bar: the seeds' range of best depths) against S, with the
    rule S·L_total and its rounding, and the dynamic runs' depths. Right: mean accuracy against
    depth per pair, markers at the measured depths, the dynamic point as a star. ``extra(axis,
    study)`` draws a third panel."""
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn

    figure = Figure(figsize=(19 if extra else 13, 5), layout="constrained")
    axes = figure.subplots(1, 3 if extra else 2)
    colours = [f"C{i % 10}" for i in range(len(study["pairs"]))]
    draw_depth_vs_s(axes[0], study, colours)
    draw_accuracy_vs_depth(axes[1], study, colours)
    if extra:
        extra(axes[2], study)
    figure.suptitle(f"Does round(S · L_total) pick the best depth? {len(study['pairs'])} pairs, "
                    f"up to {study['seeds']} seeds each")
    if study.get("test_from") and study["fallbacks"] < study["measured_runs"]:
        figure.supxlabel(f"test images: {'; '.join(study['test_from'])}", fontsize=8)
    return figure


def draw_depth_vs_s(axis, study: dict[str, Any], colours: list[str]) -> None:
    placed = [(p, c) for p, c in zip(study["pairs"], colours) if "cosine" in p["scores"]]
    xs = [p["scores"]["cosine"] for p, _ in placed] + [d["S"] for p, _ in placed for d in p["dynamic"] if d["S"] is not None]
    low, high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = max(0.02, 0.1 * (high - low))
    grid = [low - pad + i * (high - low + 2 * pad) / 400 for i in range(401)]
    measured = sorted({d for p in study["pairs"] for d in p["fixed"]})
    for depth in measured:  # the oracle can only answer one of these
        axis.axhline(depth, color="gray", linewidth=0.5, alpha=0.5)
    clipped = [min(max(s, 0.0), 1.0) for s in grid]  # the rule clips S to [0, 1]
    for l_total in study["l_totals"]:
        axis.plot(grid, [s * l_total for s in clipped], color="black", linewidth=1, label=f"rule: S · {l_total}")
        axis.step(grid, [round(s * l_total) for s in clipped], where="mid", color="gray", linewidth=1,
                  linestyle="--", label=f"rounded: round(S · {l_total})")
    for index, (pair, colour) in enumerate(sorted(placed, key=lambda item: item[0]["scores"]["cosine"])):
        s, best = pair["scores"]["cosine"], pair["best"]
        if best["min"] is not None:
            axis.vlines(s, best["min"], best["max"], color=colour, linewidth=3, alpha=0.4)
        axis.plot([s], [best["depth"]], "o", color=colour, markersize=8)
        axis.plot([d["S"] for d in pair["dynamic"] if d["S"] is not None],
                  [d["depth"] for d in pair["dynamic"] if d["S"] is not None], "*", color=colour, markersize=12)
        # neighbours in S alternate above and below their marker, so labels of close pairs do not overlap
        axis.annotate(pair["label"], (s, best["depth"]), textcoords="offset points",
                      xytext=(4, 6 if index % 2 == 0 else -13), fontsize=8)
    axis.plot([], [], "o", color="gray", label="best fixed depth (bar: seeds' range)")
    axis.plot([], [], "*", color="gray", markersize=12, label="dynamic runs' depth")
    missing = len(study["pairs"]) - len(placed)
    axis.set_xlabel("S (cosine similarity of class centroids)")
    axis.set_ylabel("frozen layers (grey lines: the measured fixed depths)")
    axis.set_title("best fixed depth vs S" + (f" ({missing} pairs without S not shown)" if missing else ""))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")


def draw_accuracy_vs_depth(axis, study: dict[str, Any], colours: list[str]) -> None:
    """Per pair its measured depths as markers (mean ± std over seeds), joined by a thin dotted guide
    (the depths between were not measured), the rule as a star; the accuracy axis zoomed, and said so."""
    counts = []
    for pair, colour in zip(study["pairs"], colours):
        depths = list(pair["fixed"])
        values = [mean_std(list(pair["fixed"][d]["acc"].values())) for d in depths]
        counts += [v.n for v in values]
        axis.plot(depths, [v[0] for v in values], linestyle=":", linewidth=1, color=colour, alpha=0.6)
        axis.errorbar(depths, [v[0] for v in values], yerr=[v[1] for v in values] if pair["seeds"][1:] else None,
                      marker="o", capsize=2,
                      color=colour, linestyle="none", label=pair["label"])
        rule = pair["arms"].get("rule")
        if rule is not None:
            counts.append(rule["acc"].n)
            axis.errorbar([rule["depth"]], [rule["acc"][0]], yerr=[rule["acc"][1]] if rule["n"] > 1 else None,
                          marker="*", markersize=12,
                          color=colour, capsize=2, linestyle="none")
    axis.plot([], [], "*", color="gray", markersize=12, label="dynamic (the rule)")
    axis.plot([], [], ":", color="gray", linewidth=1, label="dotted: a guide only (depths between not measured)")
    metric = ("held-out test accuracy" if study["fallbacks"] == 0 else "best val accuracy"
              if study["fallbacks"] == study["measured_runs"] else "accuracy (test, else best val)")
    axis.set_xlabel("frozen layers (markers: measured depths)")
    axis.set_ylabel(f"{metric}, {seeds_phrase(counts)}")
    axis.set_title(zoomed_label(axis, "accuracy vs depth per pair").replace("(axis", "(y axis"))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
