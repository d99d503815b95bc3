"""Same config and seed → the same metrics and weights on CPU; another seed → other weights."""

import json

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from tests.conftest import REPO

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=2",
        "data.classes=[ant,bee]", "data.batch_size=8", "progress=lines", "trainer.accelerator=cpu"]


def fit(image_folder, run_dir, *overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, f"data.root={image_folder}", *overrides])
    results = train.train(OmegaConf.to_container(cfg, resolve=True), run_dir)
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return json.loads((run_dir / "results.json").read_text()), results, weights


def test_same_seed_same_metrics_and_weights_other_seed_other_weights(image_folder, tmp_path):
    first, _, w1 = fit(image_folder, tmp_path / "a", "seed=3")
    again, _, w2 = fit(image_folder, tmp_path / "b", "seed=3")
    other, _, w3 = fit(image_folder, tmp_path / "c", "seed=4")
    metrics = ("best_val_acc", "final_val_acc", "test_acc", "epochs", "l_freeze", "trainable_parameters")
    assert {k: first[k] for k in metrics} == {k: again[k] for k in metrics}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # bit for bit
    assert not all(torch.equal(w1[k], w3[k]) for k in w1 if w1[k].is_floating_point())
    # the split depends on data.seed only, not on the training seed
    split = [json.loads((tmp_path / d / "split.json").read_text())["train"] for d in "ac"]
    assert split[0] == split[1]
