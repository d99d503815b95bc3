"""The learning rate chosen inside one job (``lr_search``, simfreeze.runs.rate_search): each rate to the
rung, the best resumed to the end — the same run as the one a sweep over optimizer.lr makes at that rate."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from simfreeze.config import check_rules
from simfreeze.errors import ConfigError, TrainingDiverged
from simfreeze.runs import rate_search
from tests.helpers import REPO, compose_config

# Three classes of 24 train images in batches of 24: 3 steps an epoch, 3 epochs; validated every 2 steps.
TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=30", "data.classes=[ant,bee,cow]",
        "data.batch_size=24", "progress=lines", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.max_epochs=100", "+trainer.max_steps=9", "+trainer.check_val_every_n_epoch=null",
        "+trainer.val_check_interval=2", "checkpoint.last_every_n_epochs=0"]
RATES = [1e-4, 1e-3, 1e-2]


def compose_run(image_folder, *overrides) -> dict:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, f"data.root={image_folder}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def last_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("rung, stop", [(4, 4), (3, 4)])  # after the first validation at or after the rung
def test_the_job_is_the_run_a_sweep_makes_at_the_rate_chosen_at_the_rung(image_folder, tmp_path, rung, stop):
    job = tmp_path / "job"
    results = train.train(compose_run(image_folder, f"lr_search.rates={RATES}", f"lr_search.rung={rung}"), job)
    search = results["lr_search"]
    assert [r["lr"] for r in search["rungs"]] == RATES and all(r["step"] == stop for r in search["rungs"])
    assert len({r["val_acc"] for r in search["rungs"]}) > 1  # each rate trained at its own rate
    best = max(search["rungs"], key=lambda r: r["val_acc"])  # ties: the first listed
    assert search["chosen"] == best["lr"] == results["lr"] and results["steps"] == 9
    assert json.loads((job / "results.json").read_text())["lr_search"] == search
    assert not (job / "rates" / f"lr={RATES[0]:g}" / "checkpoints").exists()  # a rung keeps its results only

    alone = train.train(compose_run(image_folder, f"optimizer.lr={best['lr']}"), tmp_path / "alone")
    for key in ("best_val_acc", "final_val_acc", "epochs", "steps"):
        assert alone[key] == results[key], key
    w_alone, w_job = last_weights(tmp_path / "alone"), last_weights(job)
    assert all(torch.equal(w_alone[k], w_job[k]) for k in w_alone)  # bit for bit (fp32 on CPU)


def test_a_job_run_again_keeps_its_finished_rungs(image_folder, tmp_path, monkeypatch):
    cfg = compose_run(image_folder, f"lr_search.rates={RATES[:2]}", "lr_search.rung=2", "trainer.max_steps=4")
    first = train.train(cfg, tmp_path / "job")
    for path in (tmp_path / "job").iterdir():  # stopped after the rungs, before the job's run
        if path.name != "rates":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    calls = []
    real_fit = rate_search_fit()
    monkeypatch.setattr("simfreeze.runs.fit.fit", lambda *a, **k: calls.append(a[1]) or real_fit(*a, **k))
    again = train.train(cfg, tmp_path / "job")  # the rungs kept; the job's run only
    assert calls == [tmp_path / "job"] and again["lr_search"]["rungs"] == first["lr_search"]["rungs"]
    assert again["best_val_acc"] == first["best_val_acc"]


def rate_search_fit():
    from simfreeze.runs.fit import fit
    return fit


def test_a_rate_that_diverges_is_an_answer_and_all_diverging_is_an_error(tmp_path):
    def fit(cfg, run_dir, overrides, callbacks=(), extra=None, show=True):
        if cfg["optimizer"]["lr"] > 0.5:
            raise TrainingDiverged("training diverged: the weights are NaN")
        return {"best_val_acc": cfg["optimizer"]["lr"], "fit_seconds": 1.0, "steps": 2}

    cfg = {"optimizer": {"lr": 0.1}, "lr_search": {"rates": [0.1, 0.2, 0.9], "rung": 2}, "checkpoint": {},
           "arm": "scratch", "seed": 0, "logs": None}
    rungs = [rate_search.run_rung(fit, cfg, rate, tmp_path, []) for rate in cfg["lr_search"]["rates"]]
    assert [r["val_acc"] for r in rungs] == [0.1, 0.2, None] and "NaN" in rungs[2]["error"]
    assert rate_search.choose(rungs)["lr"] == 0.2
    with pytest.raises(TrainingDiverged, match=r"no rate .*\(lr=0.9: training diverged"):
        rate_search.choose([rungs[2]])


@pytest.mark.parametrize("value", ["[1e-3]", "[1e-3,1e-3]", "[1e-3,-1]", "1e-3"])
def test_a_bad_rate_list_is_refused_naming_the_key(value):
    cfg = OmegaConf.to_container(compose_config([f"lr_search.rates={value}"]), resolve=True)
    with pytest.raises(ConfigError, match=r"lr_search.rates=.* must be a list of at least two different"):
        check_rules(cfg)
    check_rules(OmegaConf.to_container(compose_config([f"lr_search.rates={RATES}"]), resolve=True))


def test_the_rates_of_a_frozen_job_share_one_fill_of_the_prefix_cache(image_folder, tmp_path):
    from simfreeze.runs.transfer import LAST_FILL

    frozen = ["arm=static45", "freeze.k=9", "+source.task.positive=ant", "data.positive=bee",
              "source.recipe={optimizer:{lr:0.001}}",  # one source for every rate, as in the study
              f"source.cache_dir={tmp_path / 'sources'}"]
    LAST_FILL.clear()
    job = train.train(compose_run(image_folder, *frozen, f"lr_search.rates={RATES[:2]}", "lr_search.rung=2"),
                      tmp_path / "job")
    rungs = [json.loads((tmp_path / "job" / "rates" / f"lr={rate:g}" / "results.json").read_text()) for rate in RATES[:2]]
    assert [r["prefix_cache"]["remembered"] for r in rungs] == [False, True] and job["prefix_cache"]["remembered"]
    LAST_FILL.clear()  # the run alone fills its own cache
    alone = train.train(compose_run(image_folder, *frozen, f"optimizer.lr={job['lr']}"), tmp_path / "alone")
    assert not alone["prefix_cache"]["remembered"] and alone["prefix_cache"]["key"] == job["prefix_cache"]["key"]
    assert alone["best_val_acc"] == job["best_val_acc"] and alone["final_val_acc"] == job["final_val_acc"]
    w_alone, w_job = last_weights(tmp_path / "alone"), last_weights(tmp_path / "job")
    assert all(torch.equal(w_alone[k], w_job[k]) for k in w_alone)  # bit for bit (fp32 on CPU)


def test_the_rates_of_a_rule_setting_share_one_similarity_pass_with_the_same_result(image_folder, tmp_path):
    import torchvision

    from simfreeze.runs.transfer import LAST_SIMILARITY

    embedder = tmp_path / "embedder.pt"  # an embedder of its own, as the study's base is
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), embedder)
    rule = ["arm=dynamic", "+source.task.positive=ant", "data.positive=bee", f"similarity.embedder={embedder}",
            "source.recipe={optimizer:{lr:0.001}}", f"source.cache_dir={tmp_path / 'sources'}"]
    LAST_SIMILARITY.clear()
    first = train.train(compose_run(image_folder, *rule, f"optimizer.lr={RATES[0]}"), tmp_path / "first")
    second = train.train(compose_run(image_folder, *rule, f"optimizer.lr={RATES[1]}"), tmp_path / "second")
    assert not first["similarity_remembered"] and second["similarity_remembered"] and first["S"] == second["S"]
    assert (tmp_path / "second" / "similarity.json").read_text() == (tmp_path / "first" / "similarity.json").read_text()
    LAST_SIMILARITY.clear()  # the same run alone measures S itself
    alone = train.train(compose_run(image_folder, *rule, f"optimizer.lr={RATES[1]}"), tmp_path / "alone")
    assert not alone["similarity_remembered"] and alone["S"] == second["S"] and alone["l_freeze"] == second["l_freeze"]
    assert alone["best_val_acc"] == second["best_val_acc"] and alone["final_val_acc"] == second["final_val_acc"]
    w_alone, w_second = last_weights(tmp_path / "alone"), last_weights(tmp_path / "second")
    assert all(torch.equal(w_alone[k], w_second[k]) for k in w_alone)  # bit for bit (fp32 on CPU)
    other = train.train(compose_run(image_folder, *rule, "data.positive=cow"), tmp_path / "other")
    assert not other["similarity_remembered"]  # other target images: another pass


def test_a_source_stage_without_a_result_stops_the_search_naming_the_stage(image_folder, tmp_path):
    from simfreeze.errors import SourceFailed

    never_validates = ["arm=dynamic", "+source.task.positive=ant", "data.positive=bee",
                       "source.recipe={trainer:{max_epochs:1,check_val_every_n_epoch:5}}",
                       f"source.cache_dir={tmp_path / 'sources'}", f"lr_search.rates={RATES[:2]}", "lr_search.rung=2"]
    with pytest.raises(SourceFailed, match="source stage source:ant: the run never validated"):
        train.train(compose_run(image_folder, *never_validates), tmp_path / "job")  # not "no rate trained"
    assert not list((tmp_path / "sources").glob("source-ant-*"))  # nothing cached
