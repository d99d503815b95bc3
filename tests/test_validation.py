"""Every bad setting fails before any work with one message that names the key, the value and
what is allowed; the run directory stays empty (no split, plan, checkpoint or results)."""

import urllib.error

import pytest
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from simfreeze.config import ConfigError, validate_config
from tests.conftest import REPO, run_train

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=1",
        "data.classes=[ant,bee]"]
TRANSFER = ["+source.task.positive=ant", "data.positive=bee"]

CASES = {
    "unknown key": (["+epochs=5"], "unknown key epochs"),
    "unknown class": (["data.classes=[ant,zebra]"], "unknown class ['zebra']"),
    "positive not in classes": (["data.positive=fox"], "data.positive='fox' is not one of data.classes"),
    "per_class above the images": (["data.per_class=31"], "data.per_class=31 but class 'ant' has only 30 images"),
    "val_fraction outside (0, 1)": (["data.val_fraction=1.5"], "data.val_fraction=1.5 must lie in (0, 1)"),
    "unknown architecture": (["model.arch=resnet9000"], "model.arch='resnet9000' is not a torchvision classification"),
    "negative L_total": (["arm=dynamic", *TRANSFER, "freeze.l_total=-1"], "freeze.l_total=-1 must lie in [0, 17]"),
    "L_total reaching the head": (["arm=dynamic", *TRANSFER, "freeze.l_total=18"], "freeze.l_total=18 must lie in"),
    "static k freezing the head": (["arm=static45", *TRANSFER, "freeze.k=18"], "the head (layer 18) always trains"),
    "thresholds out of order": (["arm=threshold", *TRANSFER, "freeze.low=0.9", "freeze.high=0.8"],
                                "freeze.low=0.9, freeze.high=0.8: need 0 ≤ low ≤ high ≤ 1"),
    "threshold above 1": (["arm=threshold", *TRANSFER, "freeze.high=1.5"], "need 0 ≤ low ≤ high ≤ 1"),
    "unknown freeze.depth": (["arm=dynamic", *TRANSFER, "freeze.depth=deep"], "freeze.depth=deep must be a number"),
    "missing data root": (["data.root=/nonexistent/cifar"], "data.root='/nonexistent/cifar' does not exist"),
    "no data, download off": (["data.root=null", "data.download=false"], "no CIFAR-10 data: set data.root=/path"),
    "missing weights file": (["model.weights=/nonexistent/w.pt"], "model.weights='/nonexistent/w.pt': no such"),
    "missing source weights": (["arm=head_only", "source.weights=/nonexistent/s.pt"], "source.weights='/nonexistent/s.pt'"),
    "missing embedder": (["arm=dynamic", *TRANSFER, "similarity.embedder=/nonexistent/e.pt"],
                         "similarity.embedder='/nonexistent/e.pt': no such checkpoint"),
    "missing resume checkpoint": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt': no such"),
    "unknown precision": (["trainer.precision=17"], "trainer.precision=17 must be one of auto, 64, 32"),
    "unknown progress": (["progress=fancy"], "progress=fancy must be one of auto, bar, lines"),
}


@pytest.mark.parametrize("overrides, message", CASES.values(), ids=CASES.keys())
def test_bad_setting_fails_before_any_work(overrides, message, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_ROOT", "")  # the no-data cases must not find the real folder
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, f"data.root={image_folder}", f"data.download_dir={tmp_path / 'dl'}",
                                f"source.cache_dir={tmp_path / 'sources'}", *overrides])
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
        train.train(OmegaConf.to_container(cfg, resolve=True), run_dir)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)  # one line
    assert not [p for p in run_dir.rglob("*") if p.is_file()]  # nothing written
    assert not (tmp_path / "sources").exists()  # and no source trained


def test_a_download_that_fails_offline_says_how_to_provide_the_data(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    from simfreeze.data import DataConfigError, open_source

    with pytest.raises(DataConfigError, match="CIFAR-10 is not available .* Point data.root .* CIFAR10_ROOT"):
        open_source("cifar10", None, True, str(tmp_path))


def test_the_command_line_shows_one_error_line_and_exits_2(image_folder, tmp_path):
    result = run_train(*TINY, f"data.root={image_folder}", "ckpt_path=/nonexistent/last.ckpt",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ckpt_path='/nonexistent/last.ckpt'")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()
