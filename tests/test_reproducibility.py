"""Same config and seed → the same metrics and weights on CPU; another seed → other weights.

The promise holds in fp32 and in bf16 autocast (docs/outputs.md, "What a run leaves"): both are tested, bf16
where the CPU computes it natively (emulated bf16 is too slow for the lane).
"""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from simfreeze.speed.precision import native_cpu_bf16
from tests.helpers import REPO

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=2",
        "data.classes=[ant,bee]", "data.batch_size=8", "progress=lines", "trainer.accelerator=cpu"]


PRECISIONS = pytest.mark.parametrize("precision", [
    "32-true", pytest.param("bf16-mixed", marks=pytest.mark.skipif(
        not native_cpu_bf16(), reason="bf16 is emulated on this CPU (many times slower)"))])


def fit(image_folder, run_dir, *overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, f"data.root={image_folder}", *overrides])
    results = train.train(OmegaConf.to_container(cfg, resolve=True), run_dir)
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return json.loads((run_dir / "results.json").read_text()), results, weights


@PRECISIONS
def test_same_seed_same_metrics_and_weights_other_seed_other_weights(image_folder, tmp_path, precision):
    first, _, w1 = fit(image_folder, tmp_path / "a", "seed=3", f"trainer.precision={precision}")
    again, _, w2 = fit(image_folder, tmp_path / "b", "seed=3", f"trainer.precision={precision}")
    other, _, w3 = fit(image_folder, tmp_path / "c", "seed=4", f"trainer.precision={precision}")
    assert first["precision"] == precision
    metrics = ("best_val_acc", "final_val_acc", "test_acc", "epochs", "l_freeze", "trainable_parameters")
    assert {k: first[k] for k in metrics} == {k: again[k] for k in metrics}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # bit for bit
    assert not all(torch.equal(w1[k], w3[k]) for k in w1 if w1[k].is_floating_point())
    # the split depends on data.seed only, not on the training seed
    split = [json.loads((tmp_path / d / "split.json").read_text())["train"] for d in "ac"]
    assert split[0] == split[1]


@PRECISIONS
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(image_folder, tmp_path, monkeypatch, precision):
    from simfreeze.runs.results import FitClock

    transfer = ["arm=static45", "freeze.k=9", "+source.task.positive=ant", "data.positive=bee", "trainer.max_epochs=3",
                f"source.cache_dir={tmp_path / 'sources'}",  # a frozen prefix: the cache and the plan are restored too
                f"trainer.precision={precision}"]
    whole, _, w_whole = fit(image_folder, tmp_path / "whole", *transfer)

    original = FitClock.on_train_epoch_start

    def killed_in_epoch_two(self, trainer, pl_module):  # after epoch one: stopped, the run writes last.ckpt
        if trainer.current_epoch == 1:
            raise RuntimeError("killed")
        original(self, trainer, pl_module)
    monkeypatch.setattr(FitClock, "on_train_epoch_start", killed_in_epoch_two)
    try:
        fit(image_folder, tmp_path / "killed", *transfer)
    except RuntimeError as err:
        assert "killed" in str(err)
    monkeypatch.setattr(FitClock, "on_train_epoch_start", original)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    killed = torch.load(last, map_location="cpu", weights_only=True)
    assert killed["global_step"] == 4 and "frozen_state" in killed  # one epoch done; the frozen prefix left out
    resumed, _, w_resumed = fit(image_folder, tmp_path / "resumed", *transfer, f"ckpt_path={last}")
    assert resumed["l_freeze"] == whole["l_freeze"] == 9 and resumed["epochs"] == whole["epochs"] == 3
    assert all(torch.equal(w_whole[k], w_resumed[k]) for k in w_whole)  # bit for bit
    assert resumed["final_val_acc"] == whole["final_val_acc"]


def test_a_resume_with_other_settings_is_refused_naming_them(image_folder, tmp_path):
    from simfreeze.errors import ConfigError

    fit(image_folder, tmp_path / "first", "trainer.max_epochs=1")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"other settings: data.classes .*optimizer.lr \(0.002 → 0.01\).*seed \(0 → 4\)"):
        fit(image_folder, tmp_path / "other", "data.classes=[ant,cow]", "optimizer.lr=0.01", "seed=4", f"ckpt_path={last}")
    # the same check before any work, and checkpoints that cannot be resumed, each in one line
    from simfreeze.config import validate_config

    def refusal(*overrides):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", [*TINY, f"data.root={image_folder}", *overrides])
        with pytest.raises(ConfigError) as caught:
            validate_config(cfg)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "seed (0 → 4)" in refusal("trainer.max_epochs=1", "seed=4", f"ckpt_path={last}")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:5000])
    assert "is not a readable checkpoint" in refusal(f"ckpt_path={truncated}")
    best = tmp_path / "first" / "checkpoints" / "best.ckpt"
    assert "is not a checkpoint to resume from" in refusal(f"ckpt_path={best}")
    # where the data lives and how the run is shown may change: that is the same run
    resumed, _, _ = fit(image_folder, tmp_path / "first", "progress=bar", "trainer.max_epochs=1", f"ckpt_path={last}")
    assert resumed["status"] == "ok" and resumed["epochs"] == 1
