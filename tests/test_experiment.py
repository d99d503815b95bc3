"""The paper's protocol as one multirun (`+experiment=cat_to_dog`), scaled down to synthetic data."""

import csv
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from simfreeze.data.datamodule import TaskDataModule
from simfreeze.data.splits import shared_images
from tests.helpers import SMALL, compose_config, run_train


def composed(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(["+experiment=cat_to_dog", *overrides]), resolve=True)


def test_cat_to_dog_multirun_prints_and_writes_one_summary(cat_dog_folder, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("+experiment=cat_to_dog", *SMALL, f"data.root={cat_dog_folder}", f"hydra.sweep.dir={sweep}",
                       f"source.cache_dir={tmp_path / 'sources'}", cwd=tmp_path)
    rows = list(csv.DictReader(open(sweep / "runs.csv")))
    assert [r["arm"] for r in rows] == ["source", "scratch", "dynamic", "static45", "head_only", "finetune"]
    assert "| arm=dynamic | dynamic | 1 |" in result.stdout and (sweep / "summary.md").is_file()
    # The console: per job Hydra's line, 1 epoch line (SMALL), one result line (the source's once), the summary.
    assert result.stdout.count("[simfreeze] ") == 6 and "→ " + str(tmp_path / "sources" / ".source") not in result.stdout
    assert len(result.stdout.splitlines()) <= 40, result.stdout
    # the readable report: plans, the table, the figures and Ivanov's cost model beside measured times
    report = (sweep / "report.md").read_text()
    assert "![cost model](cost_model.png)" in report and "| arm=dynamic |" in report
    assert (sweep / "cost_model.png").read_bytes()[:4] == b"\x89PNG" and (sweep / "summary.png").is_file()
    costs = list(csv.DictReader(open(sweep / "cost_model.csv")))
    assert {c["setting"] for c in costs} == {"arm=dynamic", "arm=static45", "arm=head_only", "arm=finetune"}
    # the cat source was trained once, by the first job, and reused by every transfer arm
    assert len(list((tmp_path / "sources").glob("source-cat-*"))) == 1
    runs = {r["arm"]: json.loads((sweep / r["job"] / "results.json").read_text()) for r in rows}
    assert runs["source"]["cached"] is False
    assert all(runs[arm]["source"]["cached"] for arm in ("dynamic", "static45", "head_only", "finetune"))
    dynamic = runs["dynamic"]
    plan = json.loads((sweep / rows[2]["job"] / "plan.json").read_text())
    similarity = json.loads((sweep / rows[2]["job"] / "similarity.json").read_text())
    assert plan["l_freeze"] == dynamic["l_freeze"] == round(similarity["S"] * 13)
    assert similarity["source_classes"] == ["cat"] and similarity["target_classes"] == ["dog"]
    assert runs["static45"]["l_freeze"] == 15 and runs["head_only"]["trainable_parameters"] == 512 * 2 + 2
    assert runs["scratch"]["S"] is None and runs["finetune"]["l_freeze"] == 0
    # same images for every arm: the source's split is the target's
    source_split = json.loads((Path(runs["source"]["source_dir"]) / "split.json").read_text())
    target_split = json.loads((sweep / rows[1]["job"] / "split.json").read_text())
    assert source_split["files"] == target_split["files"] and source_split["positive"] == "cat"
    # One TensorBoard for the sweep: a run per job named by arm and seed, the source the first job
    # trained, and the summary; every job's own metrics.csv.
    board = sweep / "tensorboard"
    assert sorted({str(p.parent.relative_to(board)) for p in board.rglob("events.out.tfevents.*")}) == [
        "arm=dynamic/seed=0", "arm=finetune/seed=0", "arm=head_only/seed=0", "arm=scratch/seed=0",
        "arm=static45/seed=0", "source:cat/seed=0", "summary"]
    assert all((sweep / r["job"] / "csv" / "metrics.csv").is_file() for r in rows[1:])


def test_source_never_trains_on_target_validation_images(cat_dog_folder):
    common = dict(root=str(cat_dog_folder), classes=["cat", "dog"], per_class=20)
    source = TaskDataModule(**common, positive="cat").plan_split()
    target = TaskDataModule(**common, positive="dog").plan_split()
    assert shared_images(source, target) == {}
    # Validation takes the first images of each class's permutation, so a larger source split keeps
    # the target's val images in its own val; a smaller one trains on some of them.
    assert shared_images(TaskDataModule(**{**common, "per_class": 28}, positive="cat").plan_split(), target) == {}
    assert shared_images(TaskDataModule(**{**common, "per_class": 10}, positive="cat").plan_split(), target)


def test_leaking_source_is_refused(cat_dog_folder, tmp_path):
    result = run_train("arm=dynamic", "data.positive=dog", "source.task={positive:cat,per_class:10}",
                       *SMALL, f"data.root={cat_dog_folder}", f"hydra.run.dir={tmp_path / 'run'}",
                       f"source.cache_dir={tmp_path / 'sources'}", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "trains on" in result.stderr and "target's validation split" in result.stderr
    assert not (tmp_path / "sources").exists()


def test_a_bad_plan_fails_before_the_source_is_trained(cat_dog_folder, tmp_path):
    result = run_train("arm=static45", "data.positive=dog", "source.task={positive:cat}", *SMALL, "freeze.k=99",
                       f"data.root={cat_dog_folder}", f"hydra.run.dir={tmp_path / 'run'}",
                       f"source.cache_dir={tmp_path / 'sources'}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "freeze.k=99 must lie in [0, 17]" in result.stderr
    assert not (tmp_path / "sources").exists()


def test_cache_fill_reuses_the_similarity_pass(cat_dog_folder, tmp_path):
    # threshold with high=0 always freezes L_total layers: the deepest prefix the similarity pass kept
    run = tmp_path / "run"
    run_train("arm=threshold", "freeze.low=0", "freeze.high=0", "data.positive=dog", "source.task={positive:cat}",
              *SMALL, f"data.root={cat_dog_folder}", f"hydra.run.dir={run}", f"source.cache_dir={tmp_path / 's'}",
              cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["l_freeze"] == 13 and results["prefix_cache"]["boundary"] == "layer3.1"
    assert results["prefix_cache"]["reused_similarity_pass"] is True
    no_cache = tmp_path / "run_uncached"
    run_train("arm=threshold", "freeze.low=0", "freeze.high=0", "data.positive=dog", "source.task={positive:cat}",
              *SMALL, "cache.enabled=false", f"data.root={cat_dog_folder}", f"hydra.run.dir={no_cache}",
              f"source.cache_dir={tmp_path / 's'}", cwd=tmp_path)
    uncached = json.loads((no_cache / "results.json").read_text())
    # the same plan from the same S; the weights agree up to float rounding (tests/test_prefix.py, in float64)
    assert uncached["prefix_cache"] is None and uncached["precision_phases"]["cache_fill"] is None
    assert (uncached["S"], uncached["l_freeze"], uncached["trainable_parameters"]) == \
        (results["S"], results["l_freeze"], results["trainable_parameters"])


def test_source_key_ignores_how_the_network_runs_but_not_what_it_learns():
    from simfreeze.runs.sources import source_key

    cfg = {"data": {"classes": ["cat", "dog"], "root": None}, "model": {"arch": "resnet50", "compile": False},
           "trainer": {"max_epochs": 3, "devices": 1}, "seed": 0, "source": {"cache_dir": "a"}}
    same = {**cfg, "model": {"arch": "resnet50", "compile": True}, "trainer": {"max_epochs": 3, "devices": 2},
            "source": {"cache_dir": "b"}, "progress": "bar"}
    assert source_key(cfg) == source_key(same)
    assert source_key(cfg) != source_key({**cfg, "seed": 1})
    assert source_key(cfg) != source_key({**cfg, "trainer": {"max_epochs": 4, "devices": 1}})


def test_the_source_task_key_holds_the_precision_that_runs_not_auto(monkeypatch):
    from simfreeze.runs.sources import source_config, source_key
    from simfreeze.speed import precision

    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)  # a CPU without native bf16
    auto = source_config(composed(["arm=dynamic", "trainer.precision=auto", "trainer.accelerator=cpu"]))
    explicit = source_config(composed(["arm=static45", "trainer.precision=32-true", "trainer.accelerator=cpu"]))
    assert auto["trainer"]["precision"] == "32-true"
    assert source_key(auto) == source_key(explicit)


def test_architectures_experiment_writes_khotsyanovskys_table(cat_dog_folder, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("+experiment=architectures", "model.arch=small_cnn,mobilenet_v3_small", "arm=scratch,head_only",
                       "data.per_class=20", "data.image_size=52", "trainer.max_epochs=1", "progress=lines",
                       f"data.root={cat_dog_folder}", f"hydra.sweep.dir={sweep}",
                       f"source.cache_dir={tmp_path / 'sources'}", cwd=tmp_path)
    summary = (sweep / "summary.md").read_text()
    assert "## Architectures" in summary and "| architecture | scratch | head_only |" in summary
    rows = [line for line in summary.splitlines() if line.startswith(("| small_cnn |", "| mobilenet_v3_small |"))]
    assert len(rows) == 4  # an accuracy row and a fit-seconds row per architecture
    assert "Fit seconds (mean ± std over seeds)" in result.stdout
    # depths and times are compared within an architecture only
    assert "Best fixed depth" not in summary and not (sweep / "cost_model.png").exists()
    scratch_rows = [r for r in csv.DictReader(open(sweep / "summary.csv")) if r["arm"] == "scratch"]
    assert [r["time_vs_scratch"] for r in scratch_rows] == ["1.0", "1.0"]
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    head_only = {r["weights"]["arch"]: r for r in runs if r["arm"] == "head_only"}
    assert head_only["small_cnn"]["trainable_parameters"] == 512 * 2 + 2  # only the new head trains
    assert len(list((tmp_path / "sources").glob("source-cat-*"))) == 2  # one cat model per architecture


def test_the_pretrained_protocol_trains_a_base_once_and_embeds_with_it(tmp_path):
    from tests.helpers import make_image_folder

    root = make_image_folder(tmp_path / "data", {"ant": 20, "bee": 20, "cat": 30, "dog": 30})
    sweep, sources = tmp_path / "sweep", tmp_path / "sources"
    run_train("+experiment=cat_to_dog_pretrained", "arm=dynamic,head_only,base_finetune", *SMALL,
              "data.holdout_per_class=5", "source.source.task={classes:[ant,bee],per_class:10,skip_per_class:0}",
              f"data.root={root}", f"hydra.sweep.dir={sweep}", f"source.cache_dir={sources}", cwd=tmp_path)
    dynamic, head_only, from_base = (json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1", "2"))
    base = dynamic["source"]["source"]  # the chain: dog ← cat model ← base
    assert base["name"] == "source:ant-bee" and dynamic["source"]["name"] == "source:cat"
    # the paper's "scratch" on a pretrained start: the base → dog, every layer trained, the cat model skipped
    assert from_base["source"]["name"] == "source:ant-bee" and from_base["source"]["run_dir"] == base["run_dir"]
    assert from_base["l_freeze"] == 0 and from_base["trainable_parameters"] == from_base["total_parameters"]
    assert len(list(sources.glob("source-ant-bee-*"))) == 1 and len(list(sources.glob("source-cat-*"))) == 1
    similarity = json.loads((sweep / "0" / "similarity.json").read_text())
    assert similarity["embedder"].startswith("source.source (") and base["run_dir"] in similarity["embedder"]
    assert dynamic["images"]["test"] == head_only["images"]["test"] == 10  # the held-out images, 5 per class


def test_the_similarity_study_answers_with_pairs_depths_seeds_and_scores(tmp_path):
    """The study's reduced lane: 2 pairs × depths 0, 10 and the rule × 2 seeds on synthetic classes."""
    from tests.helpers import make_image_folder

    root = make_image_folder(tmp_path / "data", {name: 40 for name in ("dog", "horse", "cat", "automobile", "ant", "bee")})
    sweep, sources = tmp_path / "sweep", tmp_path / "sources"
    result = run_train("+experiment=similarity_study", *SMALL, "source.task.positive=cat,automobile",
                       "freeze.l_freeze=0,10,dynamic", "seed=0,1", "data.holdout_per_class=5",
                       "source.source.task={classes:[ant,bee,horse],per_class:10,skip_per_class:20}",
                       f"data.root={root}", f"hydra.sweep.dir={sweep}", f"source.cache_dir={sources}", cwd=tmp_path)
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(runs) == 12 and all(r["status"] == "ok" for r in runs)
    assert len(list(sources.glob("source-ant-bee-horse-*"))) == 1  # one base for both pairs and both seeds
    assert len(list(sources.glob("source-cat-*"))) == len(list(sources.glob("source-automobile-*"))) == 2  # per seed
    dynamic = [r for r in runs if r["policy"] == "linear"]  # the policy that ran, set by freeze.l_freeze=dynamic
    assert len(dynamic) == 4 and sorted({r["policy"] for r in runs}) == ["linear", "static"]
    similarity = json.loads((Path(dynamic[0]["run_dir"]) / "similarity.json").read_text())
    # every score from the embedder (the base); the centred cosine centred over every class it knows too
    assert similarity["embedder"].startswith("source.source (") and {"ant", "bee", "horse"} <= set(
        similarity["scores"]["centred_over"]) and similarity["images_per_class"]["ant"] == 8
    for run in dynamic:
        scores = run["scores"]
        assert abs(scores["cosine"] - run["S"]) < 1e-6 and -1 <= scores["centred_cosine"] <= 1 and abs(scores["logme"]) < 10
        assert run["l_freeze"] == round(run["S"] * run["l_total"])
        assert run["source"]["source"]["name"] == "source:ant-bee-horse"  # the chain: dog ← <class> model ← base
    base_split = json.loads((Path(dynamic[0]["source"]["source"]["run_dir"]) / "split.json").read_text())
    target_split = json.loads((sweep / "0" / "split.json").read_text())
    base_horses = set(base_split["files"]["train"]["horse"]) | set(base_split["files"]["val"]["horse"])
    assert len(base_horses) == 10 and not base_horses & {  # data.skip_per_class: the base never saw the target's images
        f for stage in ("train", "val", "holdout") for f in target_split["files"][stage]["horse"]}

    rows = list(csv.DictReader(open(sweep / "study.csv")))
    assert sorted(r["pair"] for r in rows) == ["automobile → dog", "cat → dog"]
    assert all(r["best_depth"] in ("0", "10") and r["seeds"] == "2" and r["score_logme"] for r in rows)
    summary, report = (sweep / "summary.md").read_text(), (sweep / "report.md").read_text()
    section = summary[summary.index("## Does the rule pick the right depth?"):].split("\n## ")[0]
    assert section in report and "ρ(S, best depth)" in section and "Best fixed depth" not in summary
    predictions = json.loads((sweep / "0" / "test_predictions.json").read_text())  # per held-out image
    assert len(predictions["labels"]) == len(predictions["predicted"]) == 10 and predictions["test_from"]
    held_out = "the training folder's held-out slice (the last 5 images of each class's order"
    assert f"held-out test accuracy on {held_out}" in section and f"`test acc` is on {held_out}" in summary
    assert target_split["test_from"].startswith(held_out) and all(r["test_from"].startswith(held_out) for r in runs)
    assert (sweep / "study.png").stat().st_size > 10_000
    assert "The rule picks the best depth in" in result.stdout


def test_the_study_across_regimes_chooses_rates_on_validation_and_reports_each_regime_with_its_controls(tmp_path):
    """The study across regimes' reduced lane on synthetic classes: 2 bases × 2 sources × depths 0 and 10,
    each job choosing between 2 learning rates at its first validation (lr_search), then the controls at one
    rate, summarised together."""
    from simfreeze.reports.sweep import main as summarise
    from tests.helpers import make_image_folder

    root = make_image_folder(tmp_path / "data", {name: 40 for name in ("dog", "horse", "deer", "frog", "ant", "bee")})
    study, controls, sources = tmp_path / "study", tmp_path / "controls", tmp_path / "sources"
    lane = [*SMALL, "base=cifar8,cifar8_strong", "data.train_per_class=8", "data.holdout_per_class=5",
            "source.source.task={classes:[ant,bee,horse],per_class:10,skip_per_class:20}",
            "++source.source.recipe.trainer.max_epochs=1", "++source.source.recipe.trainer.check_val_every_n_epoch=1",
            "source.recipe.trainer.max_epochs=1",
            "trainer.max_epochs=1000", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "seed=0", f"data.root={root}", f"source.cache_dir={sources}"]
    sweep = ["+experiment=regimes", *lane, "source.task.positive=deer,frog", "freeze.l_freeze=0,10", "optimizer.lr=0.002",
             "lr_search.rates=[0.002,0.0002]", "lr_search.rung=2"]
    run_train(*sweep, f"hydra.sweep.dir={study}", cwd=tmp_path)
    run_train("+experiment=regimes_controls", *lane, "arm=scratch,base_finetune", "optimizer.lr=0.002",
              f"hydra.sweep.dir={controls}", cwd=tmp_path)
    runs = [json.loads(p.read_text()) for p in [*study.glob("*/results.json"), *controls.glob("*/results.json")]]
    assert len(runs) == 8 + 4 and all(r["status"] == "ok" for r in runs)
    assert not list(study.glob("*/checkpoints")) and not list(study.glob("*/rates/*/checkpoints"))  # results only
    assert len(list(sources.glob("source-ant-bee-horse-*"))) == 2  # two bases, one each for every pair and size
    searched = [r for r in runs if r.get("lr_search")]
    assert len(searched) == 8 and all(r["lr"] == r["lr_search"]["chosen"] for r in searched)
    assert all(len(list(Path(r["run_dir"]).glob("rates/lr=*/results.json"))) == 2 for r in searched)
    assert {r["lr"] for r in runs} <= {0.002, 0.0002} and {r["train_per_class"] for r in runs} == {8}
    assert {len(r["source_chain"]) for r in runs} == {2}
    # scratch takes nothing from a base: under the second base it is the first one's twin, copied, not trained
    scratch = sorted((r for r in runs if r["arm"] == "scratch"), key=lambda r: bool(r.get("same_as")))
    assert [bool(r.get("same_as")) for r in scratch] == [False, True] and scratch[1]["same_as"] == scratch[0]["run_dir"]
    assert scratch[1]["test_acc"] == scratch[0]["test_acc"] and scratch[1]["source_chain"] != scratch[0]["source_chain"]
    assert (Path(scratch[1]["run_dir"]) / "test_predictions.json").read_text() == \
        (Path(scratch[0]["run_dir"]) / "test_predictions.json").read_text()
    summarise([str(study), str(controls)])
    summary = (study / "summary.md").read_text()
    assert summary.count("\n### base ") == 2 and "images/class" in summary and "best − scratch (random init)" in summary
    assert "learning rate(s) chosen" in summary and f"# with the jobs of {controls}" in summary
    assert (study / "study-regime1.png").is_file() and (study / "study-regime2.png").is_file()
    # carried to a machine that has only the sources: the finished jobs are kept, the one not carried runs
    from simfreeze.jobs.carry import main as carry

    elsewhere = tmp_path / "elsewhere"
    assert carry(["pack", str(study), str(tmp_path / "jobs.gz")]) == 0
    assert carry(["unpack", str(tmp_path / "jobs.gz"), str(elsewhere)]) == 0
    shutil.rmtree(elsewhere / "3")
    carried = {p.parent.name: p.read_text() for p in elsewhere.glob("*/results.json")}
    run_train(*sweep, f"hydra.sweep.dir={elsewhere}", cwd=tmp_path)
    after = {p.parent.name: p.read_text() for p in elsewhere.glob("*/results.json")}
    assert len(carried) == 7 and {job: after[job] for job in carried} == carried
    rerun, original = json.loads(after["3"]), json.loads((study / "3" / "results.json").read_text())
    assert rerun["settings_digest"] == original["settings_digest"] and rerun["test_acc"] == original["test_acc"]
