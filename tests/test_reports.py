"""What a sweep's summary says and draws, read from synthetic results.json files (no training): one
seed shown as one value, dynamic against scratch, fit times that a busy machine inflated, the
figures' honesty, TensorBoard and the last lines printed."""

import json

import pytest

from simfreeze.reports.stats import mean_std, plus_minus
from simfreeze.reports.sweep import report, summarise, write_summary

# arm: (frozen layers, best val acc, fit seconds, transfers); the numbers of a real one-seed cat_to_dog sweep
ARMS = {"source": (0, 0.631, 45.7, False), "scratch": (0, 0.634, 45.0, False), "dynamic": (39, 0.631, 23.9, True),
        "static45": (45, 0.6375, 12.2, True), "head_only": (49, 0.6406, 7.05, True), "finetune": (0, 0.619, 43.3, True)}


def arm_run(arm, seed=0, *, acc=None, seconds=None, source="source:cat"):
    depth, default_acc, default_seconds, transfer = ARMS.get(arm, (0, 0.6, 40.0, True))
    return {"status": "ok", "arm": arm, "name": f"{arm}:dog", "seed": seed, "transfer": transfer,
            "policy": "linear" if arm == "dynamic" else "static" if depth else "none", "l_freeze": depth,
            "n_layers": 50, "S": 0.98 if arm == "dynamic" else None, "trainable_parameters": 1000 * (50 - depth) + 2,
            "best_val_acc": default_acc if acc is None else acc, "test_acc": None,
            "images": {"train": 1280, "val": 320}, "classes": 2,
            "fit_seconds": default_seconds if seconds is None else seconds,
            "source": {"name": source, "fit_seconds": 45.7} if transfer else None,
            "overrides": ["+experiment=cat_to_dog", f"arm={arm}", f"seed={seed}"]}


def write_sweep(directory, runs):
    for job, r in enumerate(runs):
        (directory / str(job)).mkdir(parents=True)
        (directory / str(job) / "results.json").write_text(json.dumps({**r, "run_dir": str(directory / str(job))}))
    return directory


def documents(sweep):
    return (sweep / "summary.md").read_text(), (sweep / "report.md").read_text()


def test_one_value_is_shown_alone_and_two_with_their_std():
    one, two = mean_std([0.6]), mean_std([0.6, 0.62])
    assert one == (0.6, 0.0) and one.n == 1 and two.n == 2  # still a (mean, std) pair to unpack
    assert plus_minus(one) == "0.600" and plus_minus(two) == "0.610 ± 0.014" and plus_minus(None) == "–"
    assert plus_minus((0.6, 0.0)) == "0.600 ± 0.000"  # a pair that does not say its n is taken as it is


def test_a_one_seed_sweep_says_one_seed_once_and_no_plus_minus_zero(tmp_path, capsys):
    sweep = write_sweep(tmp_path, [arm_run(arm) for arm in ARMS])
    assert report(sweep, "python -m train +experiment=cat_to_dog") == 0
    out = capsys.readouterr().out
    for text in (*documents(sweep), out):
        assert "± 0.0" not in text
        assert text.count("One seed per setting") == 1
        assert "| arm=dynamic | dynamic | 1 | 0.9800 | 39 | 11,002 | 0.631 | 23.9 | 0.531 |" in text
    import csv

    dynamic = next(r for r in csv.DictReader(open(sweep / "summary.csv")) if r["arm"] == "dynamic")
    assert dynamic["best_val_acc_mean"] == "0.631" and dynamic["best_val_acc_std"] == ""  # no std for one seed
    assert "best val acc 0.641." in out and "(0.631);" in out  # the depth verdict, numbers alone too
    # one seed: what the gap is against the validation set's sampling error and chance, not against seed noise
    assert ("in best val acc (0.631); 1 seed, so no seed noise to judge it by; measured on 320 images, an accuracy "
            "near 0.63 has a sampling error of 2.7 points (one binomial SE); the gap is 3 of 320 images; chance is "
            "50 %.") in out
    assert "0.3 points below it, in 0.53× its fit time; 1 seed, so no seed noise" in out and "is 1 of 320 images" in out


def test_several_seeds_keep_mean_and_std(tmp_path):
    runs = [arm_run(arm, seed, acc=ARMS[arm][1] + 0.01 * seed) for seed in (0, 1) for arm in ARMS]
    write_summary(write_sweep(tmp_path, runs))
    summary_md, _ = documents(tmp_path)
    assert "Mean ± std over seeds (sample std)" in summary_md and "One seed" not in summary_md
    assert "| 0.636 ± 0.007 |" in summary_md


def line_styles(axis):
    """Each drawn line of an axis (empty legend proxies aside): its label (an error bar's, for its
    data line) and line style."""
    labels = {id(c.lines[0]): c.get_label() for c in axis.containers}
    return [(labels.get(id(line), line.get_label()), line.get_linestyle()) for line in axis.lines if len(line.get_xdata())]


def test_the_depth_figure_marks_measured_depths_and_says_what_it_shows(tmp_path):
    from simfreeze.reports.depth import depth_verdict
    from simfreeze.reports.plots import depth_figure

    rows = summarise([arm_run(arm) for arm in ARMS])
    figure = depth_figure(rows, depth_verdict(rows))
    accuracy, seconds = figure.axes
    assert figure.get_suptitle() == ("accuracy and fit time vs frozen layers (1 seed per setting: bars are the 95 % "
                                     "binomial interval on 320 validation images)")
    curve = [c for c in accuracy.containers if c.get_label() == "fixed depth (measured)"][0]
    half_width = 1.96 * (0.6375 * (1 - 0.6375) / 320) ** 0.5  # static45's point at 45
    segment = curve.lines[2][0].get_segments()[1]  # its error bar, from mean − half to mean + half
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * half_width, rel=1e-6)
    assert ("chance (50 %)", ":") in line_styles(accuracy)
    assert {"static45", "head_only", "finetune"} <= {text.get_text() for text in accuracy.texts}
    # the source's accuracy is on its own task: a reference on the time panel only
    assert "arm=source" not in {text.get_text() for text in accuracy.texts}
    assert "arm=source" in {text.get_text() for text in seconds.texts}
    styles = line_styles(accuracy)
    # the measured depths are markers only; what joins them is a dotted guide, and the legend says so
    assert ("fixed depth (measured)", "None") in styles
    assert ("dotted: a guide only (depths between not measured)", ":") in styles
    assert not [label for label, style in styles if style == "-"]
    low, high = accuracy.get_ylim()
    assert accuracy.get_ylabel() == f"best val accuracy (axis zoomed: {low:.3f}–{high:.3f})" and low < 0.5
    assert seconds.get_ylim()[0] == 0
    runs = [arm_run(arm, seed, acc=ARMS[arm][1] + 0.01 * seed) for seed in (0, 1, 2) for arm in ARMS]
    assert "(mean ± std over 3 seeds)" in depth_figure(summarise(runs)).get_suptitle()


def test_the_study_figure_joins_depths_with_a_dotted_guide_and_says_its_axis_is_zoomed():
    from simfreeze.reports.study import analyse_study, study_figure
    from tests.test_study_report import two_pairs

    right = study_figure(analyse_study(two_pairs(), draws=20)).axes[1]
    styles = line_styles(right)
    assert {style for label, style in styles if label in ("cat → dog", "cat → truck")} == {"None"}
    assert [style for _, style in styles].count(":") == 2  # one guide per pair
    assert "-" not in {style for _, style in styles}
    assert right.get_title().startswith("accuracy vs depth per pair (y axis zoomed: ")
    assert right.get_ylabel() == "held-out test accuracy, mean ± std over 2 seeds"


def test_dynamic_is_compared_with_scratch_in_points_against_the_seed_noise(tmp_path, capsys):
    one = write_sweep(tmp_path / "one", [arm_run(arm) for arm in ARMS])
    assert report(one, "python -m train +experiment=cat_to_dog") == 0
    sentence = ("Against scratch: arm=dynamic (similarity-driven) has best val acc 0.631 against scratch's 0.634, "
                "**0.3 points below** it, in 0.53× its fit time; 1 seed, so no seed noise to judge it by; measured on "
                "320 images, an accuracy near 0.63 has a sampling error of 2.7 points (one binomial SE); the gap is 1 "
                "of 320 images; chance is 50 %.")
    out = capsys.readouterr().out
    assert all(sentence in text for text in documents(one)) and sentence.replace("**", "") in out
    # three seeds: dynamic 0.62 ± 0.01, scratch 0.60 ± 0.02; SE = √(0.01²/3 + 0.02²/3) = 1.29 points, Welch's
    # df = 2.9 → t = 4.30 (at 2 df: the wider), so the 95 % half-width is 5.6 points, not 2·SE = 2.6
    runs = [arm_run("scratch", s, acc=0.60 + d) for s, d in enumerate((-0.02, 0.0, 0.02))]
    runs += [arm_run("dynamic", s, acc=0.62 + d) for s, d in enumerate((-0.01, 0.0, 0.01))]
    write_summary(write_sweep(tmp_path / "three", runs))
    summary_md, report_md = documents(tmp_path / "three")
    assert ("has best val acc 0.620 ± 0.010 against scratch's 0.600 ± 0.020, **2.0 points above** it, in 0.53× its "
            "fit time; within seed noise (95 % half-width of the difference = 5.6 points: t = 4.30 × SE, Welch, 3 "
            "and 3 seeds).") in summary_md
    assert "**2.0 points above**" in report_md
    # without a scratch arm there is nothing to compare with
    write_summary(write_sweep(tmp_path / "none", [arm_run(arm) for arm in ("dynamic", "static45")]))
    assert "Against scratch" not in documents(tmp_path / "none")[0]


def test_a_fit_time_above_scratchs_for_no_more_layers_is_flagged_not_failed(tmp_path, capsys):
    slowed = {"static45": 2.7 * 45.0, "source": 1.05 * 45.0}  # static45 on a busy machine; the source within 10 %
    runs = [arm_run(arm, seconds=slowed.get(arm)) for arm in ARMS]
    assert report(write_sweep(tmp_path, runs), "python -m train +experiment=cat_to_dog") == 0
    note = ("Fit time above scratch's (by more than 10 %) although the setting trains no more layers: arm=static45 "
            "2.70× (5,002 trainable parameters against 50,002). That is more likely a busy machine than the method")
    assert all(note in text for text in documents(tmp_path)) and note in capsys.readouterr().out
    calm = tmp_path / "calm"
    write_summary(write_sweep(calm, [arm_run(arm) for arm in ARMS]))
    assert "busy machine" not in documents(calm)[0]


def test_the_cost_figure_keeps_its_legend_off_the_data_and_shows_the_line_that_coincides():
    from simfreeze.reports.cost import cost_markdown, sweep_costs
    from simfreeze.reports.plots import cost_figure

    tables, scratch_s = sweep_costs(summarise([arm_run(arm) for arm in ARMS]))
    figure = cost_figure(tables)
    (axis,) = figure.axes
    assert axis.get_legend() is None and len(figure.legends) == 1 and len(figure.legends[0].texts) == 9
    lines = {line.get_label(): line for line in axis.lines}
    classic = lines["classic: k · scratch (= its formula)"]
    finetune = lines["arm=finetune: formula (0 + 50·k) · t = classic (F = 0)"]
    assert list(finetune.get_ydata()) == pytest.approx(list(classic.get_ydata()))  # the same numbers, by construction
    # drawn so that both show: a wide translucent band under a dashed line with crosses
    assert (finetune.get_linestyle(), finetune.get_marker()) == ("--", "x") and classic.get_zorder() < finetune.get_zorder()
    assert classic.get_linewidth() > 2 * finetune.get_linewidth()
    assert "With F = 0 (arm=finetune) the formula is the classic line by construction" in cost_markdown(tables, scratch_s)


def test_tensorboard_gets_summary_md_and_every_figure_written_and_no_depth_as_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_summary(write_sweep(tmp_path, [arm_run(arm) for arm in ARMS]))
    events = EventAccumulator(str(tmp_path / "tensorboard" / "summary")).Reload()
    assert events.Tags()["scalars"] == []  # a depth as a scalar's "Step" would misread
    text = events.Tensors("experiment/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == (tmp_path / "summary.md").read_text()
    assert sorted(events.Tags()["images"]) == ["sweep/accuracy_and_time_vs_depth", "sweep/cost_model"]
    assert {path.name for path in tmp_path.glob("*.png")} == {"summary.png", "cost_model.png"}


def test_the_last_lines_name_both_documents_the_figures_and_tensorboard(tmp_path, capsys):
    write_sweep(tmp_path, [arm_run(arm) for arm in ARMS])
    report(tmp_path, "python -m train +experiment=cat_to_dog")
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-2:]
    assert last == [f"in {tmp_path}: summary.md, report.md, summary.png, cost_model.png",
                    f"tensorboard --logdir {tmp_path / 'tensorboard'}"]


def pretrained_runs():
    """``+experiment=cat_to_dog_pretrained``: base_finetune starts from the base, the other transfer arms
    from the cat model (itself trained from the base); base_finetune has the best accuracy here."""
    return [arm_run(arm) for arm in ARMS] + [arm_run("base_finetune", acc=0.70, seconds=44.0, source="source:base")]


def test_the_depth_oracle_compares_only_settings_that_start_from_the_same_model(tmp_path):
    from simfreeze.reports.depth import depth_verdict, verdict_text
    from simfreeze.reports.plots import depth_figure

    rows = summarise(pretrained_runs())
    verdict = depth_verdict(rows)
    # both freeze 0 layers, but base_finetune's 0 is another model's: head_only (49) is the best depth of the cat model
    assert verdict["best_setting"] == "arm=head_only" and verdict["start"] == "source:cat"
    assert verdict["left_out"] == [("arm=base_finetune", "source:base")]
    assert verdict["fixed_range"] == pytest.approx((0.619, 0.6406))
    assert ("Left out of this comparison, as they start from another model than source:cat: arm=base_finetune "
            "(from source:base).") in verdict_text(verdict)
    accuracy = depth_figure(rows, verdict).axes[0]
    curve = [c for c in accuracy.containers if c.get_label() == "fixed depth (measured)"][0]
    assert list(curve.lines[0].get_xdata()) == [0, 45, 49] and 0.70 not in curve.lines[0].get_ydata()
    assert "arm=base_finetune (starts from source:base)" in [c.get_label() for c in accuracy.containers]


def test_the_runs_table_uses_the_main_tables_formats_and_a_dash_for_what_is_missing():
    from simfreeze.reports.documents import runs_table

    done = {**arm_run("dynamic"), "job": 0, "best_val_acc": 0.646875, "fit_seconds": 23.91234}
    failed = {"job": 1, "status": "failed", "seed": 1, "overrides": ["arm=dynamic", "seed=1"]}
    table = runs_table([done, failed], ["arm"])
    assert "| 0 | ok | arm=dynamic | 0 | 0.9800 | 39 | 0.6469 | 23.9 |" in table
    assert "| 1 | failed | arm=dynamic | 1 | – | – | – | – |" in table and "None" not in table
