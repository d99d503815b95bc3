"""Every bad setting fails before any work with one message that names the key, the value and
what is allowed; the run directory stays empty (no split, plan, checkpoint or results)."""

import os
import subprocess
import sys
import threading
import urllib.error

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from simfreeze.config import validate_config
from simfreeze.errors import ConfigError, RunDirInUse
from simfreeze.runs.preflight import claim_run_dir
from tests.helpers import REPO, run_train

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=1",
        "data.classes=[ant,bee]"]
TRANSFER = ["+source.task.positive=ant", "data.positive=bee"]

CASES = {
    "unknown key": (["+epochs=5"], "unknown key epochs"),
    "unknown data key": (["+data.per_clas=5"], "unknown key data.per_clas"),
    "unknown trainer key": (["+trainer.max_epoch=5"], "unknown key trainer.max_epoch"),
    "unknown class": (["data.classes=[ant,zebra]"], "unknown class ['zebra']"),
    "positive not in classes": (["data.positive=fox"], "data.positive='fox' is not one of data.classes"),
    "per_class above the images": (["data.per_class=31"], "data.per_class=31 but class 'ant' has only 30 images"),
    "val_fraction outside (0, 1)": (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be a number in (0, 1)"),
    "unknown architecture": (["model.arch=resnet9000"], "model.arch='resnet9000' is not a torchvision classification"),
    "negative L_total": (["arm=dynamic", *TRANSFER, "freeze.l_total=-1"], "freeze.l_total=-1 must be an integer ≥ 0"),
    "L_total reaching the head": (["arm=dynamic", *TRANSFER, "freeze.l_total=18"], "freeze.l_total=18 must lie in"),
    "static k freezing the head": (["arm=static45", *TRANSFER, "freeze.k=18"], "the head (layer 18) always trains"),
    "thresholds out of order": (["arm=threshold", *TRANSFER, "freeze.low=0.9", "freeze.high=0.8"],
                                "freeze.low=0.9, freeze.high=0.8: need 0 ≤ low ≤ high ≤ 1"),
    "threshold above 1": (["arm=threshold", *TRANSFER, "freeze.high=1.5"], "need 0 ≤ low ≤ high ≤ 1"),
    "bad freeze.l_freeze": (["arm=dynamic", *TRANSFER, "freeze.l_freeze=deep"], "freeze.l_freeze=deep must be a number"),
    "missing data root": (["data.root=/nonexistent/cifar"], "data.root='/nonexistent/cifar' does not exist"),
    "no data, download off": (["data.root=null", "data.download=false"], "no CIFAR-10 data: set data.root=/path"),
    "missing weights file": (["model.weights=/nonexistent/w.pt"], "model.weights='/nonexistent/w.pt': no such"),
    "missing source weights": (["arm=head_only", "source.weights=/nonexistent/s.pt"], "source.weights='/nonexistent/s.pt'"),
    "missing embedder": (["arm=dynamic", *TRANSFER, "similarity.embedder=/nonexistent/e.pt"],
                         "similarity.embedder='/nonexistent/e.pt': no such checkpoint"),
    "missing resume checkpoint": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt': no such"),
    "unknown precision": (["trainer.precision=17"], "trainer.precision=17 must be one of auto, 64, 32"),
    "unknown progress": (["progress=fancy"], "progress=fancy must be one of auto, bar, lines"),
    "a fractional seed": (["seed=1.5"], "seed=1.5 must be an integer"),
    "a text seed": (["seed=abc"], 'seed="abc" must be an integer'),
    "a fractional split seed": (["data.seed=0.5"], "data.seed=0.5 must be an integer"),
    "negative learning rate": (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 must be a number > 0"),
    "zero learning rate": (["optimizer.lr=0"], "optimizer.lr=0 must be a number > 0"),
    "zero batch size": (["data.batch_size=0"], "data.batch_size=0 must be an integer ≥ 1"),
    "absurd image size": (["data.image_size=10000"], "data.image_size=10000 must be an integer in [8, 1024]"),
    "image size 0": (["data.image_size=0"], "data.image_size=0 must be an integer in [8, 1024]"),
    "image size 1": (["data.image_size=1"], "data.image_size=1 must be an integer in [8, 1024]"),
    "no epochs": (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer ≥ 1"),
    "endless epochs": (["trainer.max_epochs=-1", "scheduler=none"], "trainer.max_epochs=-1 must be an integer ≥ 1"),
    "label smoothing above 1": (["model.label_smoothing=1.5"], "model.label_smoothing=1.5 must be a number in [0, 1)"),
    "fractional static k": (["arm=static45", *TRANSFER, "freeze.k=2.5"], "freeze.k=2.5 must be an integer ≥ 0"),
    "boolean static k": (["arm=static45", *TRANSFER, "freeze.k=true"], "freeze.k=true must be an integer ≥ 0"),
    "unknown optimizer key": (["+optimizer.momentum=0.9"], "unknown key optimizer.momentum; allowed: amsgrad"),
    "a bad value in a source task": (["arm=dynamic", "data.positive=bee", "+source.task.positive=ant",
                                      "+source.task.per_class=1"], "source.task.per_class=1 must be an integer ≥ 2"),
    "Lightning's special resume names": (["ckpt_path=last"], "ckpt_path='last': no such checkpoint file"),
    "an earlier stage of a chain leaks": (
        ["arm=staged", "freeze.k=3", "source.task={classes:[ant,bee,cow]}", "source.freeze={policy:static,k:2}",
         "source.source={task:{classes:[ant,bee,cow],val_fraction:0.1}}"],
        "source stage 2 (source.source.task) trains on {'ant': 2, 'bee': 2} images of the target's validation split"),
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
    assert not list(run_dir.rglob("*"))  # nothing written, not even the claimed checkpoints/ folder
    assert not (tmp_path / "sources").exists()  # and no source trained


def test_a_download_that_fails_offline_says_how_to_provide_the_data(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    from simfreeze.data.images import open_source
    from simfreeze.errors import DataConfigError

    with pytest.raises(DataConfigError, match="CIFAR-10 is not available .* Point data.root .* CIFAR10_ROOT"):
        open_source("cifar10", None, True, str(tmp_path))


def one_error_line(result) -> str:
    """The whole of stderr, which must be exactly one ``error:`` line; exit status 2."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Hydra's own composition errors, which it would print as a multi-line report.
HYDRA_CASES = {
    "unknown group option": (["arm=nope"], "error: arm=nope: no such option; arm is one of base_finetune, dynamic, finetune, "
                                           "head_only, scratch, source, staged, static45, threshold"),
    "unknown experiment": (["+experiment=nope"], "error: experiment=nope: no such option; experiment is one of "
                                                 "architectures, cat_to_dog, cat_to_dog_pretrained, depth_sweep, similarity_matrix, similarity_study, staged"),
    "unknown launcher": (["hydra/launcher=nope"], "error: hydra/launcher=nope: no such option; hydra/launcher is one of"),
    "unknown key without +": (["data.per_clas=5"], "error: unknown key data.per_clas: the config has no such key"),
    "override syntax": (["data.per_class=[1"], "error: no viable alternative at input '[1'"),
    "unknown option in a sweep": (["-m", "arm=scratch,nope"], "error: arm=nope: no such option"),
    "bad key in one sweep job": (["-m", "seed=0,1", "+epochs=5"], "error: unknown key epochs; allowed: arm, cache"),
}


@pytest.mark.parametrize("overrides, message", HYDRA_CASES.values(), ids=HYDRA_CASES.keys())
def test_hydra_errors_are_one_line_before_any_work(overrides, message, tmp_path):
    line = one_error_line(run_train(*overrides, cwd=tmp_path, check=False))
    assert line.startswith(message)
    assert not (tmp_path / "outputs").exists()  # no run or sweep directory made


def test_concurrent_runs_refused_in_the_job_each_print_one_line_and_leave_nothing(image_folder, tmp_path):
    """Two runs started together from one directory (default run dirs), refused only once the data is
    read: one line each, and the directories Hydra made for them are removed again."""
    command = [sys.executable, "-m", "train", f"data.root={image_folder}", "data.classes=[ant,zebra]"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert one_error_line(subprocess.CompletedProcess(command, run.returncode, "", stderr)).startswith(
            "error: data.classes: unknown class ['zebra']")
    assert list((tmp_path / "outputs" / "runs").glob("*/*")) == []


def test_a_used_run_or_sweep_directory_is_refused_before_hydra_writes_to_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    line = one_error_line(run_train(f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False))
    assert line.startswith(f"error: hydra.run.dir='{run_dir}' already holds a run (results.json)")
    assert not (run_dir / ".hydra").exists() and (run_dir / "results.json").read_text() == "{}"

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("{}")
    line = one_error_line(run_train("-m", "seed=0,1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, check=False))
    assert line == f"error: hydra.sweep.dir='{sweep_dir}' already holds a sweep (multirun.yaml); give a new " \
                   "directory (the default is a new timestamp)"
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["multirun.yaml"]


def test_of_runs_claiming_one_directory_together_exactly_one_wins(tmp_path):
    run_dir = tmp_path / "run"
    outcomes = []

    def claim():
        try:
            claim_run_dir(run_dir, None)
            outcomes.append("claimed")
        except RunDirInUse:
            outcomes.append("refused")
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 7
    # resuming from the directory's own checkpoint continues that run in place; another one may not
    last = run_dir / "checkpoints" / "last.ckpt"
    claim_run_dir(run_dir, str(last))
    with pytest.raises(RunDirInUse, match="; that run left no checkpoint to resume from$"):  # killed before its first
        claim_run_dir(run_dir, str(tmp_path / "other" / "checkpoints" / "last.ckpt"))
    last.write_bytes(b"")
    with pytest.raises(RunDirInUse, match=f"; or resume that run with ckpt_path={last}$"):
        claim_run_dir(run_dir, str(tmp_path / "other" / "checkpoints" / "last.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_refused():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", ["trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but this machine has no CUDA GPU"):
        validate_config(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["seed=1.5"], "error: seed=1.5 must be an integer"),
    (["ckpt_path=/nonexistent/last.ckpt"], "error: ckpt_path='/nonexistent/last.ckpt': no such checkpoint file"),
    (["-m", "seed=0,1", "data.batch_size=0"], "error: data.batch_size=0 must be an integer ≥ 1 (in the sweep's job"),
])
def test_a_value_refused_before_the_run_writes_nothing(overrides, message, tmp_path):
    line = one_error_line(run_train(*overrides, cwd=tmp_path, check=False))
    assert line.startswith(message)
    assert not (tmp_path / "outputs").exists()  # no run directory, no .hydra/, no train.log


def test_folders_the_run_writes_must_be_folders_and_writable(tmp_path, monkeypatch):
    from simfreeze.config import check_writable_folder

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="source.cache_dir='.*a_file' is a file, not a folder"):
        check_writable_folder("source.cache_dir", str(tmp_path / "a_file"))
    check_writable_folder("hydra.run.dir", str(tmp_path / "new" / "run"))  # made later, under a writable folder
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder looks (root writes anyway)
    with pytest.raises(ConfigError, match=r"hydra.run.dir='.*/new/run': .* is not writable"):
        check_writable_folder("hydra.run.dir", str(tmp_path / "new" / "run"))
