"""Chains of transfers (the staged AlexNet paper): `+experiment=staged` scaled down, its stage table,
and that table as one section of both summary.md and report.md."""

import json

import pytest

from simfreeze.reports.documents import REPORT_SECTIONS, SUMMARY_SECTIONS
from simfreeze.reports.stages import chain_of, last_stage_speedup, stage_rows, stages_markdown
from simfreeze.reports.sweep import write_summary
from tests.helpers import make_image_folder, run_train

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def chained(seed, seconds, acc=0.9):
    first = {"name": "source:all", "l_freeze": 0, "fit_seconds": 30.0 + seed, "best_val_acc": 0.5}
    second = {"name": "source:animals", "l_freeze": 3, "fit_seconds": 20.0, "best_val_acc": 0.6, "source": first}
    return {"arm": "staged", "seed": seed, "status": "ok", "l_freeze": 4, "fit_seconds": seconds,
            "best_val_acc": acc, "name": "staged:cat-dog-noise", "source": second}


def test_stage_rows_and_the_last_stage_against_scratch():
    runs = [chained(0, 2.0), chained(1, 4.0),
            {"arm": "scratch", "seed": 0, "status": "ok", "fit_seconds": 20.0, "best_val_acc": 0.8},
            {"arm": "scratch", "seed": 1, "status": "ok", "fit_seconds": 16.0, "best_val_acc": 0.7}]
    assert [s["name"] for s in chain_of(runs[0])] == ["source:all", "source:animals", "staged:cat-dog-noise"]
    rows = stage_rows(runs)
    assert [(r["stage"], r["l_freeze"], r["n"]) for r in rows] == [(1, [0], 2), (2, [3], 2), (3, [4], 2)]
    assert rows[0]["fit_seconds"][0] == pytest.approx(30.5)
    speedup = last_stage_speedup(runs)
    assert speedup["ratio_of_means"] == pytest.approx(18.0 / 3.0)
    assert speedup["median_ratio"] == pytest.approx((10.0 + 4.0) / 2) and speedup["pairs"] == 2
    assert "**6.00× faster**" in stages_markdown(runs)
    assert stages_markdown([{**runs[2]}]) == ""  # no chain, no stage table


def headed_blocks(markdown):
    """``## heading`` → the text from it to the next heading."""
    blocks = {}
    for block in markdown.split("\n## ")[1:]:
        heading, _, body = block.partition("\n")
        blocks[heading] = body.strip()
    return blocks


def test_summary_and_report_show_a_shared_section_with_the_same_text(tmp_path):
    runs = [chained(0, 2.0), chained(1, 4.0),
            {"arm": "scratch", "seed": 0, "status": "ok", "fit_seconds": 20.0, "best_val_acc": 0.8, "l_freeze": 0},
            {"arm": "scratch", "seed": 1, "status": "ok", "fit_seconds": 16.0, "best_val_acc": 0.7, "l_freeze": 0}]
    for job, run in enumerate(runs):  # a sweep directory as the jobs leave it, without training
        (tmp_path / str(job)).mkdir()
        run = {**run, "overrides": [f"arm={run['arm']}", f"seed={run['seed']}"], "run_dir": str(tmp_path / str(job)),
               "trainable_parameters": 10, "transfer": run["arm"] != "scratch", "policy": "static", "test_acc": None}
        (tmp_path / str(job) / "results.json").write_text(json.dumps(run))
    write_summary(tmp_path, "python -m train +experiment=staged seed=0,1")
    summary, report = (headed_blocks((tmp_path / name).read_text()) for name in ("summary.md", "report.md"))
    stages = "Stages of the chain (the staged AlexNet paper)"
    assert stages in summary and summary[stages] == report[stages]
    assert summary[stages].startswith("Mean ± std over the chained runs (one chain per seed).")
    assert "**6.00× faster**" in summary[stages]
    assert summary["Results"] == report["Results"] and "| arm=staged | staged | 2 |" in summary["Results"]
    # what each document shows besides: the jobs' rows in the summary, the files in the report
    assert "Runs" in summary and "Runs" not in report and "Files" in report and "Files" not in summary
    shared = set(SUMMARY_SECTIONS) & set(REPORT_SECTIONS)
    assert shared == {"command", "study", "results", "depth_verdict", "scratch", "figure", "stages", "architectures"}


def test_staged_experiment_trains_each_stage_once_and_reports_the_chain(tmp_path_factory, tmp_path):
    root = make_image_folder(tmp_path_factory.mktemp("cifar10_names"), {name: 12 for name in CIFAR10_CLASSES})
    sweep, sources = tmp_path / "sweep", tmp_path / "sources"
    result = run_train("+experiment=staged", "seed=0", "data.per_class=12", "source.task.per_class=10",
                       "source.source.task.per_class=10", "trainer.max_epochs=1", "progress=lines",
                       f"data.root={root}", f"hydra.sweep.dir={sweep}", f"source.cache_dir={sources}", cwd=tmp_path)
    runs = {r["arm"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    staged, scratch = runs["staged"], runs["scratch"]
    stage2, stage1 = staged["source"], staged["source"]["source"]
    assert (staged["l_freeze"], stage2["l_freeze"], stage1["l_freeze"]) == (4, 3, 0)
    assert staged["images"]["train"] == 10 + 10 + 4 * 2 and stage2["images"]["train"] == 6 * 8 and stage1["images"]["train"] == 80
    assert scratch["l_freeze"] == 0 and scratch.get("source") is None
    assert len(list(sources.glob("source-*"))) == 2  # stage 1 and stage 2, cached for the next run
    summary = (sweep / "summary.md").read_text()
    assert "## Stages of the chain" in summary and "faster** (ratio of the means" in summary
    # stdout: the stage table and the speed-up line, without markdown's bold
    assert "| stage | task | frozen layers | n | fit s |" in result.stdout
    assert "× faster (ratio of the means" in result.stdout


def test_a_study_lists_each_source_as_its_own_row_and_a_shared_base_once():
    base = {"name": "source:cifar8", "run_dir": "/cache/base", "l_freeze": 0, "fit_seconds": 100.0, "best_val_acc": 0.7}

    def job(seed, source):
        middle = {"name": f"source:{source}", "run_dir": f"/cache/{source}-{seed}", "l_freeze": 0, "fit_seconds": 10.0,
                  "best_val_acc": 0.8, "source": base}
        return {"arm": "depth", "seed": seed, "status": "ok", "l_freeze": 20, "fit_seconds": 5.0, "best_val_acc": 0.6,
                "name": "depth:dog", "run_dir": f"/sweep/{source}-{seed}", "source": middle}
    rows = stage_rows([job(seed, source) for source in ("cat", "automobile") for seed in (0, 1, 2)])
    assert [(r["stage"], r["task"], r["n"]) for r in rows] == [
        (1, "source:cifar8", 1), (2, "source:cat", 3), (2, "source:automobile", 3), (3, "depth:dog", 6)]
