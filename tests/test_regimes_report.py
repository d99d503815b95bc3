"""The study across regimes: a learning rate chosen per setting on validation, runs filed by base ×
target size, the controls, and the overview's verdict (synthetic runs: no training)."""

import csv

import pytest

from simfreeze.reports.regimes import analyse_regimes, regime_key, regimes_verdict, split_regimes
from simfreeze.reports.study import analyse_study
from simfreeze.reports.sweep import write_summary
from tests.test_study_report import run as study_run

BASES = {"weak": "aaaaaaaaaaaaaaaa", "strong": "bbbbbbbbbbbbbbbb"}


def run(source, target, seed, depth, acc, *, base="weak", size=640, lr=0.002, val=None, arm="depth", policy="static"):
    """One job's results.json with the fields a study across regimes reads: its base (the last of
    its chain of sources), its training images per class and its learning rate."""
    result = study_run(source, target, seed, depth, acc, policy=policy, S=0.9 if policy == "linear" else None)
    key = BASES[base]
    result.update(arm=arm, lr=lr, train_per_class=size, best_val_acc=acc if val is None else val,
                  source_chain=[{"name": f"source:{source}", "key": "c" * 16}, {"name": "source:base", "key": key}])
    result["source"]["source"] = {"name": "source:base", "run_dir": f"/cache/source-base-{key}",
                                  "test_acc": 0.70 if base == "weak" else 0.86}
    if arm != "depth":  # a control: no source model of its own
        result.update(transfer=arm == "base_finetune", l_freeze=0, source=None, name=f"{arm}:{target}")
    return result


def pair(source, target, accs, **kw):
    """``accs``: depth → per-seed accuracies (two seeds), and the rule at depth 30 with 0.60."""
    runs = [run(source, target, seed, depth, acc, **kw) for depth, per_seed in accs.items()
            for seed, acc in enumerate(per_seed)]
    return runs + [run(source, target, seed, 30, 0.60, policy="linear", **kw) for seed in (0, 1)]


def test_each_depth_is_scored_at_the_learning_rate_its_validation_chose():
    # at depth 0 the high rate validates better but tests worse: the report must not peek at the test
    runs = pair("cat", "dog", {0: (0.70, 0.72), 45: (0.65, 0.65)}, lr=0.002)
    runs += [run("cat", "dog", seed, 0, 0.80, lr=0.0002, val=0.60) for seed in (0, 1)]
    runs += [run("cat", "dog", seed, 45, 0.66, lr=0.0002, val=0.90) for seed in (0, 1)]
    runs += pair("frog", "dog", {0: (0.70, 0.70), 45: (0.60, 0.60)})
    study = analyse_study(runs, draws=20)
    cat = study["pairs"][0]
    assert cat["fixed"][0]["lr"] == 0.002 and cat["fixed"][0]["acc"] == {0: 0.70, 1: 0.72}
    assert cat["fixed"][45]["lr"] == 0.0002 and cat["fixed"][45]["acc"] == {0: 0.66, 1: 0.66}
    assert cat["fixed"][0]["rates"] == {0.0002: 0.60, 0.002: pytest.approx(0.71)}
    assert cat["best"]["depth"] == 45  # chosen on validation (0.90), whatever the test says


def test_a_tie_on_validation_goes_to_the_smaller_rate():
    runs = [run("cat", "dog", 0, 0, acc, lr=lr, val=0.7) for lr, acc in ((0.002, 0.5), (0.0002, 0.6))]
    runs += [run("cat", "dog", 0, 45, 0.5), *pair("frog", "dog", {0: (0.7, 0.7), 45: (0.6, 0.6)})]
    assert analyse_study(runs, draws=20)["pairs"][0]["fixed"][0]["lr"] == 0.0002


def regimes_runs(strong_pays: bool = True):
    """Two regimes, weak base and strong base at 50 images/class, two pairs each; with the strong
    base, freezing 45 layers beats fine-tuning by 10 points in the cat pair (and ties in frog)."""
    runs = []
    for base in ("weak", "strong"):
        pays = base == "strong" and strong_pays
        runs += pair("cat", "dog", {0: (0.70, 0.72), 20: (0.69, 0.70), 45: (0.80, 0.82) if pays else (0.60, 0.61)},
                     base=base, size=50)
        runs += pair("frog", "dog", {0: (0.70, 0.71), 20: (0.69, 0.69), 45: (0.62, 0.63)}, base=base, size=50)
        runs += [run("-", "dog", seed, 0, 0.55, base=base, size=50, arm="scratch") for seed in (0, 1)]
        runs += [run("-", "dog", seed, 0, 0.68, base=base, size=50, arm="base_finetune") for seed in (0, 1)]
    return runs


def test_runs_are_filed_by_base_and_target_size_and_controls_join_their_regime():
    runs = regimes_runs()
    assert regime_key(runs[0]) == (BASES["weak"], 50)
    images_only = {**runs[0], "train_per_class": None, "images": {"train": 1280}, "classes": 2}
    assert regime_key(images_only) == (BASES["weak"], 640)  # recorded before train_per_class: from the images
    regimes = split_regimes(runs + [run("cat", "dog", 0, 0, 0.7, size=640)])
    assert [r["label"] for r in regimes] == ["base 0.700 · 50 images/class", "base 0.700 · 640 images/class",
                                             "base 0.860 · 50 images/class"]
    assert sum(len(r["runs"]) for r in regimes) == len(runs) + 1


def test_the_overview_says_where_freezing_pays_and_measures_the_controls():
    regimes = analyse_regimes(regimes_runs(), draws=20)
    weak, strong = regimes
    assert [p["best"]["depth"] for p in strong["study"]["pairs"]] == [45, 0]
    versus = strong["versus_controls"]
    assert versus["scratch"]["mean"][0] == pytest.approx(100 * ((0.81 + 0.705) / 2 - 0.55))
    assert versus["base_finetune"]["pairs"][0]["gap"] == pytest.approx(100 * (0.81 - 0.68))
    words = regimes_verdict(regimes)
    # no per-image outcomes here: "beyond noise" from seed noise (the cat pair at 45: +10 points)
    assert "A frozen setting beat fine-tuning beyond noise in 1 of 4 pairs × regimes" in words
    assert "base 0.860 · 50 images/class: cat → dog (depth 45: +10.0)" in words
    assert "nowhere" in regimes_verdict(analyse_regimes(regimes_runs(strong_pays=False), draws=20))


def test_one_regime_stays_an_ordinary_study_even_with_a_failed_job():
    runs = [r for r in regimes_runs() if r["source_chain"][-1]["key"] == BASES["weak"]]
    failed = {"status": "failed", "job": "7", "error": "RuntimeError: boom"}  # records no regime
    assert analyse_regimes([*runs, failed]) is None and analyse_study([*runs, failed], draws=20) is not None


def test_a_sweep_across_regimes_writes_one_section_and_figure_per_regime(tmp_path):
    import json

    for job, result in enumerate(regimes_runs()):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "results.json").write_text(json.dumps({**result, "job": job,
                                                                      "run_dir": str(tmp_path / str(job))}))
    summary = write_summary(tmp_path, "python -m train +experiment=study_regimes")
    text = (tmp_path / "summary.md").read_text()
    assert "### base 0.700 · 50 images/class" in text and "### base 0.860 · 50 images/class" in text
    assert "(study-regime1.png)" in text and "(study-regime2.png)" in text and "(study.png)" not in text
    assert (tmp_path / "study-regime2.png").is_file() and not (tmp_path / "summary.png").exists()
    from simfreeze.reports.regimes import write_figures
    from simfreeze.reports.study import study_figure

    (name, figure), = write_figures(tmp_path, analyse_regimes(regimes_runs(), draws=20)[1:], study_figure)
    assert name == "study-regime1.png" and figure.get_suptitle().startswith("base 0.860 · 50 images/class: ")
    assert figure.axes[-1].get_xlabel() == "fit seconds, mean over pairs"  # the third panel: the Pareto view
    with open(tmp_path / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["regime"] for r in rows} == {"base 0.700 · 50 images/class", "base 0.860 · 50 images/class"}
    assert "A frozen setting beat fine-tuning" in summary["study"]


def test_each_regime_shows_accuracy_against_fit_time_with_its_pareto_front():
    from simfreeze.reports.regimes import settings_cost

    strong = analyse_regimes(regimes_runs(), draws=20)[1]
    settings = {s["setting"]: s for s in settings_cost(strong["study"])}
    # fit seconds are 100 − depth: depth 45 (0.7525 mean over pairs) is faster and more accurate than 0 and 20
    assert settings["depth 45"]["acc"] == pytest.approx((0.81 + 0.625) / 2)
    assert settings["depth 45"]["seconds"] == pytest.approx(55)
    assert [name for name, s in settings.items() if s["front"]] == ["depth 45"]  # the rule (70 s, 0.60) is behind it
    assert settings["rule"]["lrs"] == [0.002]


def test_the_rule_counts_as_freezing_that_pays_when_it_beats_fine_tuning_on_the_held_out_images():
    from simfreeze.reports.regimes import frozen_against_finetune

    finetune, rule = [True] * 960 + [False] * 40, [True] * 1000  # 40 of 1,000 images: +4.0 points
    pair = {"best": {"depth": 0}, "correct": {0: {0: finetune}}, "dynamic": [{"seed": 0, "correct": rule}],
            "arms": {"finetune": {"regret": 0.0, "within_noise": True}, "rule": {"depth": 26.0, "regret": -4.0}}}
    [compared] = frozen_against_finetune(pair)  # the best depth is 0: only the rule froze anything
    assert compared["setting"] == "the rule at 26 layers" and compared["gap"] == pytest.approx(4.0)
    assert compared["beyond"] and 0 < compared["interval"][0] < 4.0 < compared["interval"][1]
    pair["dynamic"][0]["correct"] = finetune  # the same outcomes: no gap
    pair["arms"]["rule"]["regret"] = 0.0
    assert not frozen_against_finetune(pair)[0]["beyond"]


def test_a_base_trained_twice_with_different_results_is_named_in_the_report():
    from simfreeze.reports.regimes import regimes_markdown, retrained_note

    runs = regimes_runs()
    assert retrained_note(runs) is None  # one training of each base: nothing to say
    carried = [r for r in runs if r["source_chain"][-1]["key"] == BASES["strong"]]
    carried[0]["source"]["source"] = {**carried[0]["source"]["source"], "test_acc": 0.8571, "best_val_acc": 0.86}
    note = retrained_note(runs)
    assert f"`source-base-{BASES['strong']}` (val 0.8600, held-out 0.8571; val –, held-out 0.8600)" in note
    assert note in regimes_markdown(analyse_regimes(runs, draws=20))


def test_the_summary_makes_the_report_its_experiment_declares_and_says_when_it_cannot_yet():
    from simfreeze.reports.sweep import analyses

    runs = regimes_runs()
    assert analyses(runs, "regimes", "")[0] == "regimes" and analyses(runs, "auto", "")[0] == "regimes"
    kind, regimes, study, note = analyses(runs, "study", "")  # declared a study: the pairs pooled, as asked
    assert (kind, regimes, note) == ("study", None, "") and study is not None
    weak = [r for r in runs if r["source_chain"][-1]["key"] == BASES["weak"]]
    kind, _, study, note = analyses(weak, "regimes", "")  # a grid part-way: one regime finished so far
    assert kind == "study" and study is not None and "one regime so far" in note
    one_pair = [r for r in weak if (r["source"] or {}).get("name") == "source:cat" or r["arm"] != "depth"]
    kind, _, study, note = analyses(one_pair, "study", "")
    assert (kind, study) == ("depth", None) and "no two source → target pairs" in note
    assert analyses(one_pair, "auto", "| arch |")[0] == "architectures" and analyses(one_pair, "depth", "")[3] == ""
    with pytest.raises(ValueError, match="not one of auto, depth"):
        analyses(runs, "pairs", "")


def test_summarising_by_hand_makes_the_report_the_sweep_recorded(tmp_path):
    import json

    from simfreeze.reports.sweep import main

    weak = [r for r in regimes_runs() if r["source_chain"][-1]["key"] == BASES["weak"]]
    for job, result in enumerate(weak):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "results.json").write_text(json.dumps({**result, "run_dir": str(tmp_path / str(job))}))
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides: {task: [], hydra: []}\n  callbacks: {summary: {report: regimes}}\n")
    main([str(tmp_path)])
    assert "one regime so far" in (tmp_path / "summary.md").read_text()
    main([str(tmp_path), "--report", "depth"])
    assert "one regime so far" not in (tmp_path / "summary.md").read_text()
