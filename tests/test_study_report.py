"""The similarity study's report: the oracle per pair, regrets, ρ with its bootstrap, the verdict in
words, and the study section of a sweep's summary (synthetic runs: no training)."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simfreeze.reports.study import (analyse_study, average_ranks, bootstrap_spearman, l_total_of, spearman,
                                     study_pairs, study_verdict, TITLE)
from simfreeze.reports.sweep import report, write_summary

DEPTHS = (0, 20, 45, 49)


def run(source, target, seed, depth, acc, *, policy="static", S=None, scores=None, test=True):
    """One job's results.json as a study sweep writes it (fit seconds: 100 − depth)."""
    label = "dynamic" if policy == "linear" else depth
    return {"status": "ok", "arm": "depth", "policy": policy, "transfer": True, "seed": seed, "l_freeze": depth,
            "n_layers": 50, "l_total": 40, "S": S, "scores": scores, "best_val_acc": acc + 0.05,
            "test_acc": acc if test else None, "fit_seconds": 100.0 - depth, "trainable_parameters": 10,
            "source": {"name": f"source:{source}", "fit_seconds": 40.0 + seed, "cached": seed > 0},
            "name": f"depth:{target}",
            "overrides": ["+experiment=study", f"source.task.positive={source}", f"data.positive={target}",
                          f"freeze.l_freeze={label}", f"seed={seed}"]}


def pair_runs(source, target, accs, dynamic, S, test=True, scores=None):
    """``accs``: depth → per-seed accuracies; ``dynamic``: (depth, per-seed accuracies) of the rule."""
    runs = [run(source, target, seed, depth, acc, test=test) for depth, per_seed in accs.items()
            for seed, acc in enumerate(per_seed)]
    depth, per_seed = dynamic
    runs += [run(source, target, seed, depth, acc, policy="linear", S=S, test=test,
                 scores={"cosine": S, **(scores or {})}) for seed, acc in enumerate(per_seed)]
    return runs


def two_pairs():
    """cat → dog: best depth 20 (0.68), the seeds' best depths 20 and 45, noise 2.0 points;
    cat → truck: best depth 45 (0.61), both seeds agree, noise √0.00008 = 0.894 points."""
    dog = pair_runs("cat", "dog", {0: (0.60, 0.62), 20: (0.70, 0.66), 45: (0.64, 0.68), 49: (0.58, 0.58)},
                    (37, (0.66, 0.64)), 0.92)
    truck = pair_runs("cat", "truck", {0: (0.50, 0.50), 20: (0.55, 0.57), 45: (0.60, 0.62), 49: (0.59, 0.59)},
                      (24, (0.55, 0.55)), 0.60)
    return dog + truck


def by_label(study):
    return {pair["label"]: pair for pair in study["pairs"]}


def test_the_best_depth_its_spread_and_the_seed_noise_per_pair():
    pairs = by_label(analyse_study(two_pairs(), draws=50))
    dog, truck = pairs["cat → dog"], pairs["cat → truck"]
    assert list(pairs) == ["cat → dog", "cat → truck"]
    assert dog["best"] == {"depth": 20, "per_seed": [20, 45], "min": 20, "max": 45}
    assert truck["best"] == {"depth": 45, "per_seed": [45, 45], "min": 45, "max": 45}
    # pooled: the mean of the per-setting sample variances, 4 depths and the rule
    assert dog["noise"] == pytest.approx(2.0)
    assert truck["noise"] == pytest.approx(100 * (0.00008 ** 0.5))
    assert dog["se"] == pytest.approx(2.0)  # 2.0 · √(2/2)
    assert dog["scores"] == {"cosine": pytest.approx(0.92)} and dog["source_seconds"] == (40.5, pytest.approx(0.7071, rel=1e-3))


def test_regrets_depth_errors_and_time_are_exact():
    study = analyse_study(two_pairs(), draws=50)
    dog, truck = by_label(study)["cat → dog"], by_label(study)["cat → truck"]
    regrets = {arm: round(a["regret"], 6) for arm, a in dog["arms"].items()}
    assert regrets == {"best": 0.0, "rule": 3.0, "static45": 2.0, "head_only": 10.0, "finetune": 7.0}
    within = {arm: a["within_noise"] for arm, a in dog["arms"].items()}  # 2·SE = 4.0 points
    assert within == {"best": True, "rule": True, "static45": True, "head_only": False, "finetune": False}
    assert truck["arms"]["rule"]["regret"] == pytest.approx(6.0) and truck["arms"]["static45"]["regret"] == pytest.approx(0)
    # the rule's 37 layers sit nearest 45, not the best 20, but 45 is one seed's best depth
    assert (dog["rule_depth"], dog["depth_error"], dog["picks"], dog["in_spread"]) == (37, 17, False, True)
    assert (truck["depth_error"], truck["picks"], truck["in_spread"]) == (-21, False, False)
    rule = study["arms"]["rule"]
    assert rule["regret"][0] == pytest.approx(4.5) and rule["regret"][1] == pytest.approx(2 ** 0.5 * 1.5)
    static45 = dog["arms"]["static45"]
    assert static45["time_ratio"] == pytest.approx(55 / 100) and static45["saved_seconds"] == pytest.approx(45)
    assert study["arms"]["head_only"]["time_ratio"] == pytest.approx(51 / 100)


def test_spearman_uses_average_ranks_for_ties():
    assert average_ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    # ranks (1, 2.5, 2.5, 4) and (1, 2, 3.5, 3.5): Σdxdy = 3.75, Σdx² = Σdy² = 4.5
    assert spearman([1, 2, 2, 3], [10, 20, 30, 30]) == pytest.approx(3.75 / 4.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None and spearman([0.9, 0.9], [20, 45]) is None


def spread_study():
    """Four pairs whose best depth rises with S."""
    runs = []
    for source, target, S, best in (("cat", "dog", 0.95, 45), ("cat", "frog", 0.80, 20),
                                    ("cat", "truck", 0.60, 0), ("deer", "horse", 0.90, 45)):
        # the third seed favours 49 layers a little: its own best depth moves where the best is 45
        accs = {d: tuple(0.7 - abs(d - best) / 200 + noise for noise in (0.0, 0.01, -0.012 + 0.03 * (d == 49)))
                for d in DEPTHS}
        runs += pair_runs(source, target, accs, (round(S * 40), (0.66, 0.67, 0.65)), S,
                          scores={"centred_cosine": 2 * S - 1, "logme": -S})
    return runs


def test_the_bootstrap_interval_holds_the_estimate_and_repeats_exactly():
    study = analyse_study(spread_study())
    rows = {row["score"]: row for row in study["correlations"]}
    cosine = rows["cosine"]
    assert cosine["rho"] == pytest.approx(spearman([0.95, 0.80, 0.60, 0.90], [45, 20, 0, 45]))
    assert cosine["low"] <= cosine["rho"] <= cosine["high"]
    assert 0 < cosine["used"] < cosine["draws"] == 2000  # draws of one pair (or one best depth) are skipped
    # LogME = −S here: the same draws give the mirrored interval
    assert rows["logme"]["rho"] == pytest.approx(-cosine["rho"]) and rows["logme"]["low"] == pytest.approx(-cosine["high"])
    points = [(pair["scores"]["cosine"], pair) for pair in study["pairs"]]
    first, second = bootstrap_spearman(points, 300), bootstrap_spearman(points, 300)
    assert first == second and first["used"] > 0
    verdict = study_verdict(study)
    assert (f"ρ(S, best depth) = 0.95 [{cosine['low']:.2f}, 1.00] over 4 pairs (95 % hierarchical bootstrap, "
            f"{cosine['used']} of 2000 draws defined); too few pairs for a claim (below 5 the exact test cannot "
            f"reach p < 0.05, and every ρ of 2 pairs is ±1): no evidence either way") in verdict
    assert "none is named the better predictor from these point estimates" in verdict and "best (ρ" not in verdict
    # fewer draws, a wider interval: then the verdict does not claim evidence
    few = {row["score"]: row for row in analyse_study(spread_study(), draws=400)["correlations"]}["cosine"]
    assert few["low"] < 0 < few["high"]


def test_a_rule_that_clearly_loses_is_said_to_lose():
    runs = []
    for target, S in (("dog", 0.5), ("truck", 0.55)):  # the rule: 20 and 22 layers; the best is 45
        accs = {0: (0.60, 0.61, 0.60), 20: (0.62, 0.63, 0.62), 45: (0.75, 0.76, 0.75), 49: (0.70, 0.71, 0.70)}
        runs += pair_runs("cat", target, accs, (round(S * 40), (0.61, 0.62, 0.61)), S)
    study = analyse_study(runs, draws=50)
    verdict = study_verdict(study)
    assert "**The rule picks the best depth in 0 of 2 pairs**" in verdict
    assert "It is **14.0 points below the best depth**" in verdict
    assert "The rule **loses to** static45 by 14.0 points on average over 2 pairs (beyond seed noise" in verdict
    assert "The rule **loses to** head_only by 9.0 points" in verdict
    assert "The rule beats finetune by 1.0 points" in verdict
    assert "ρ(S, best depth) is undefined: S or the best depth is the same in every pair." in verdict


def test_one_seed_gives_no_noise_estimate_and_names_the_fallback_metric():
    runs = [r for r in two_pairs() if r["seed"] == 0]
    for r in runs:
        r["test_acc"] = None  # only best val accuracy (acc + 0.05): regrets are unchanged
    study = analyse_study(runs, draws=50)
    assert all(p["noise"] is None for p in study["pairs"]) and study["noise"] is None
    assert by_label(study)["cat → dog"]["arms"]["rule"]["regret"] == pytest.approx(4.0)  # 0.70 − 0.66
    verdict = study_verdict(study)
    assert "with one seed per setting there is no noise estimate" in verdict
    assert "within seed noise" not in verdict and "beyond seed noise" not in verdict
    assert "Accuracy: best val accuracy (no run recorded a held-out test accuracy), which both chooses" in verdict


def test_one_seed_with_held_out_images_judges_each_pair_over_the_images():
    runs = [r for r in two_pairs() if r["seed"] == 0]
    for r in runs:  # 1,000 held-out images; the first acc × 1,000 right: settings nest, so the pairs are tight
        r["test_correct"] = [i < round(r["test_acc"] * 1000) for i in range(1000)]
    study = analyse_study(runs, draws=200)
    verdict = study_verdict(study)
    # the rule's regret per pair: 4.0 points (dog: 0.70 − 0.66) and 5.0 (truck: 0.60 − 0.55), each beyond noise
    assert "per pair, over the held-out images, it is beyond noise in 2 of 2" in verdict
    assert "with one seed per setting the mean has no seed-noise estimate" in verdict
    assert "no difference here can be told" not in verdict


def test_a_study_needs_two_pairs_with_two_fixed_depths_each():
    dog_only = [r for r in two_pairs() if r["name"] == "depth:dog"]
    assert study_pairs(dog_only) is None and analyse_study(dog_only) is None
    one_depth = [r for r in two_pairs() if r["name"] == "depth:dog" or r["l_freeze"] in (45, 24)]
    assert study_pairs(one_depth) is None
    third = pair_runs("deer", "horse", {45: (0.6, 0.6)}, (36, (0.6, 0.6)), 0.9)
    study = analyse_study(two_pairs() + third, draws=50)
    assert [p["label"] for p in study["pairs"]] == ["cat → dog", "cat → truck"]
    assert study["left_out"] == ["deer → horse"]
    assert "Left out (fewer than two fixed depths): deer → horse." in study_verdict(study)
    assert l_total_of({}) == 40 and l_total_of({"l_total": 0}) == 0 and l_total_of({"l_total": 39}) == 39


def write_sweep(directory, runs):
    for job, r in enumerate(runs):
        (directory / str(job)).mkdir()
        (directory / str(job) / "results.json").write_text(json.dumps({**r, "run_dir": str(directory / str(job))}))


def study_section(text):
    """The study section of a document, from its heading to its figure (a section without a heading
    may follow it)."""
    start = text.index(f"## {TITLE}\n")
    return text[start:text.index("](study.png)", start)]


def test_write_summary_adds_the_study_section_and_files(tmp_path, capsys):
    write_sweep(tmp_path, two_pairs())
    summary = write_summary(tmp_path, "python -m train +experiment=study seed=0,1")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["pair"]: row for row in csv.DictReader(open(tmp_path / "study.csv"))}
    assert list(rows) == ["cat → dog", "cat → truck"]
    assert rows["cat → dog"]["best_depth"] == "20" and float(rows["cat → dog"]["rule_regret"]) == pytest.approx(3.0)
    summary_md, report_md = (tmp_path / "summary.md").read_text(), (tmp_path / "report.md").read_text()
    body = study_section(summary_md)
    assert body == study_section(report_md) and "The rule picks the best depth in 0 of 2 pairs" in body
    assert "| pair | best depth | rule | static45 | head_only | finetune |" in body and "![best depth vs S" in body
    # right after the command in both documents
    assert summary_md.index("```\n\n## " + TITLE) < summary_md.index("## Results")
    # the generic depth verdict and figure pool the pairs: left out
    assert summary["verdict"] == "" and "Best fixed depth" not in summary_md + report_md
    assert not (tmp_path / "summary.png").exists() and "summary.png" not in summary_md + report_md
    assert summary["study"].startswith("**The rule picks the best depth")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "summary")).Reload()
    assert "study/best_depth_vs_S" in events.Tags()["images"] and "experiment/summary/text_summary" in events.Tags()["tensors"]
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("depth/")]
    assert report(tmp_path, "python -m train +experiment=study") == 0
    assert "The rule picks the best depth in 0 of 2 pairs" in capsys.readouterr().out


def test_an_ordinary_depth_sweep_has_no_study_section(tmp_path):
    write_sweep(tmp_path, [r for r in two_pairs() if r["name"] == "depth:dog"])
    summary = write_summary(tmp_path, "python -m train +experiment=depth_sweep")
    summary_md, report_md = (tmp_path / "summary.md").read_text(), (tmp_path / "report.md").read_text()
    assert summary["study"] == "" and TITLE not in summary_md + report_md
    assert not (tmp_path / "study.png").exists() and not (tmp_path / "study.csv").exists()
    assert "Best fixed depth (chosen on best val acc): **20**" in summary_md and (tmp_path / "summary.png").exists()


def test_when_every_pair_has_the_same_best_depth_the_scores_are_ranked_against_the_loss_of_deep_freezing():
    """Fine-tuning wins everywhere (ρ with the best depth is undefined), but the less similar the source,
    the more freezing 45 or 49 layers costs: ρ(S, loss) = −1 and the verdict says the premise holds."""
    runs = []
    for source, S, loss in (("cat", 0.98, 0.02), ("deer", 0.9, 0.05), ("frog", 0.8, 0.07), ("truck", 0.6, 0.10)):
        accs = {0: (0.84, 0.85, 0.84), 20: (0.83, 0.83, 0.835), 45: tuple(a - loss for a in (0.84, 0.85, 0.84)),
                49: tuple(a - 1.5 * loss for a in (0.84, 0.85, 0.84))}
        runs += pair_runs(source, "dog", accs, (round(S * 40), (0.83, 0.83, 0.83)), S)
    study = analyse_study(runs, draws=200)
    assert [r["rho"] for r in study["correlations"]] == [None]
    loss = {r["depth"]: r for r in study["loss_correlations"]}
    assert sorted(loss) == [45, 49] and loss[45]["rho"] == pytest.approx(-1.0) and loss[49]["high"] < 0
    verdict = study_verdict(study)
    assert "ρ(S, best depth) is undefined" in verdict
    assert "Points lost by freezing 49 layers" in verdict and "4 pairs are too few for a claim (at least 5)" in verdict


def test_a_study_with_a_failed_deep_job_of_one_seed_is_still_summarised(tmp_path):
    runs = two_pairs() + pair_runs("cat", "frog", {0: (0.52, 0.50), 20: (0.58, 0.56), 45: (0.57, 0.55), 49: (0.5, 0.5)},
                                   (30, (0.55, 0.56)), 0.7)
    failed = next(r for r in runs if r["source"]["name"] == "source:cat" and r["name"] == "depth:dog"
                  and r["l_freeze"] == 45 and r["seed"] == 1)
    failed.update(status="failed", error="RuntimeError: out of memory", test_acc=None, best_val_acc=None)
    study = analyse_study(runs, draws=200)  # a bootstrap draw of seed 1 alone has no depth 45 for dog
    assert study is not None and all(row["used"] <= row["draws"] for row in study["loss_correlations"])
    for index, result in enumerate(runs):
        (tmp_path / str(index)).mkdir()
        (tmp_path / str(index) / "results.json").write_text(json.dumps(result))
    summary = write_summary(tmp_path)
    assert summary is not None and [r["status"] for r in summary["failed"]] == ["failed"]



def test_the_best_depth_is_chosen_on_validation_and_scored_on_the_held_out_images():
    """Depth 20 wins on validation, depth 45 on test: the oracle is 20 (chosen on val), and the
    regrets are test accuracy against depth 20's, so an arm can beat the chosen best (regret < 0)."""
    runs = two_pairs()
    for r in runs:
        if r["name"] == "depth:dog" and r["policy"] == "static":
            r["best_val_acc"] = {0: 0.60, 20: 0.75, 45: 0.70, 49: 0.55}[r["l_freeze"]]
            r["test_acc"] = {0: 0.60, 20: 0.66, 45: 0.70, 49: 0.58}[r["l_freeze"]]
    dog = by_label(analyse_study(runs, draws=50))["cat → dog"]
    assert dog["best"]["depth"] == 20 and dog["best"]["per_seed"] == [20, 20]
    assert dog["arms"]["static45"]["regret"] == pytest.approx(-4.0)  # 0.66 − 0.70 on test: beats the chosen depth
    assert dog["arms"]["best"]["acc"][0] == pytest.approx(0.66)
    study = analyse_study(runs, draws=50)
    assert "chosen on best val accuracy and scored on held-out test accuracy" in study_verdict(study)


def test_rank_correlations_get_exact_permutation_tests_corrected_over_everything_computed():
    from simfreeze.reports.study import holm, permutation_p

    # 5 pairs in the same order: 2 of 5! = 120 orderings reach |ρ| = 1; reversed the same; a tie stays a tie
    assert permutation_p([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == pytest.approx(2 / 120)
    assert permutation_p([1, 2, 3, 4, 5], [50, 40, 30, 20, 10]) == pytest.approx(2 / 120)
    assert permutation_p([1, 2], [3, 4]) == 1.0 and permutation_p([1, 2, 3], [5, 5, 5]) is None
    many = permutation_p(list(range(10)), list(range(10)))  # 10! orderings: drawn, (k + 1) / (N + 1)
    assert many == pytest.approx(1 / 10_001, abs=3 / 10_001)
    assert holm([0.01, None, 0.04, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.06), pytest.approx(0.06)]
    # six pairs whose best depth rises with S: ρ = 1, exact p = 2/720, Holm over the study's 3 scores × (1 + 2 depths)
    runs = []
    for i, S in enumerate((0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
        best = (0, 20, 20, 45, 45, 49)[i]
        accs = {d: tuple(0.70 - 0.001 * abs(d - best) + 0.002 * s for s in range(2)) for d in DEPTHS}
        runs += pair_runs(f"s{i}", "dog", accs, (round(S * 40), (0.69, 0.69)), S,
                          scores={"centred_cosine": S, "logme": 1 - S})
    study = analyse_study(runs, draws=100)
    cosine = {r["score"]: r for r in study["correlations"]}["cosine"]
    assert cosine["p"] == pytest.approx(permutation_p([0.5, 0.6, 0.7, 0.8, 0.9, 0.95], [0, 20, 20, 45, 45, 49]))
    assert cosine["family"] == 9 and cosine["p_holm"] >= cosine["p"] and cosine["claim"] is (cosine["p_holm"] < 0.05)
    verdict = study_verdict(study)
    assert f"exact permutation p = {cosine['p']:.3f}, {cosine['p_holm']:.3f} after Holm's correction over the 9" in verdict



def test_noise_is_judged_with_students_t_at_the_pooled_degrees_of_freedom():
    from simfreeze.reports.stats import t_975, welch_df

    assert t_975(14) == 2.145 and t_975(2.9) == 4.303 and t_975(35) == 2.042 and t_975(5000) == 1.960
    assert t_975(0) == float("inf") and welch_df(0.01, 3, 0.01, 3) == pytest.approx(4.0)
    study = analyse_study(two_pairs(), draws=50)
    dog = by_label(study)["cat → dog"]
    assert dog["df"] == 5  # 2 seeds × (4 depths and the rule): 5 × (2 − 1)
    rule = dog["arms"]["rule"]
    assert rule["within_noise"] is (abs(rule["regret"]) <= 2.571 * rule["se"])
    assert "t = 2.57, 5 df" in study_verdict(study)


def test_with_per_image_outcomes_regrets_get_intervals_over_seeds_and_images():
    from simfreeze.reports.stats import paired_interval

    runs = two_pairs()
    for r in runs:  # 200 held-out images; a run gets the first round(acc · 200) right
        right = round(r["test_acc"] * 200)
        r["test_correct"] = [i < right for i in range(200)]
    dog = by_label(analyse_study(runs, draws=50))["cat → dog"]
    # best (20): 0.70 and 0.66 by seed; static45: 0.64 and 0.68, so seed 1 favours static45: the interval holds 0
    low, high = dog["arms"]["static45"]["interval"]
    assert low < 0 < high and low <= dog["arms"]["static45"]["regret"] <= high
    assert dog["arms"]["static45"]["within_noise"] is True
    low, high = dog["arms"]["head_only"]["interval"]  # 0.58 for both seeds: every draw is above 0
    assert 0 < low <= dog["arms"]["head_only"]["regret"] <= high and dog["arms"]["head_only"]["within_noise"] is False
    assert "[+" in accuracy_table_of(dog)
    mean, low, high = paired_interval([[True, False] * 50] * 3, [[True, False] * 50] * 3)
    assert (mean, low, high) == (0.0, 0.0, 0.0)  # the same outcomes: no difference, no spread
    assert paired_interval([[True] * 10] * 2, [[False] * 10] * 2, draws=10)[0] == 100.0
    again = paired_interval([[i % 3 == 0 for i in range(90)]] * 2, [[i % 2 == 0 for i in range(90)]] * 2)
    assert again == paired_interval([[i % 3 == 0 for i in range(90)]] * 2, [[i % 2 == 0 for i in range(90)]] * 2)


def accuracy_table_of(pair):
    from simfreeze.reports.study import accuracy_table

    return accuracy_table({"pairs": [pair], "arms": {arm: None for arm in ("rule", "static45", "head_only", "finetune")}})

