"""Every bad setting fails before any work with one message that names the key, the value and
what is allowed; the run directory stays empty (no split, plan, checkpoint or results)."""

import os
import re
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
from simfreeze.errors import ConfigError, RunDirInUse, RunWithoutResult, TrainingDiverged
from simfreeze.runs.preflight import claim_run_dir
from tests.helpers import REPO, compose_config, run_train

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
    "the shorthand past the head": (["arm=dynamic", *TRANSFER, "freeze.l_freeze=100"],
                                    "freeze.l_freeze=100 must lie in [0, 17]: the head (layer 18) always trains"),
    "thresholds out of order": (["arm=threshold", *TRANSFER, "freeze.low=0.9", "freeze.high=0.8"],
                                "freeze.low=0.9, freeze.high=0.8: need 0 ≤ low ≤ high ≤ 1"),
    "threshold above 1": (["arm=threshold", *TRANSFER, "freeze.high=1.5"], "need 0 ≤ low ≤ high ≤ 1"),
    "bad freeze.l_freeze": (["arm=dynamic", *TRANSFER, "freeze.l_freeze=deep"], "freeze.l_freeze=deep must be a number"),
    "missing data root": (["data.root=/nonexistent/cifar"], "data.root='/nonexistent/cifar' does not exist"),
    "a file as data root": (["data.root=" + str(REPO / "Makefile")], "data.root='" + str(REPO / "Makefile") + "' is a file"),
    "a Lightning refusal of the trainer": (["+trainer.max_time=abc"], "trainer: Lightning refuses these settings: "
                                           "`Timer(duration='abc')` is not a valid duration"),
    "a missing embedder of the similarity matrix": (["+experiment=similarity_matrix", "data.classes=[ant,bee,cow]",
                                                     "similarity.embedder=/nonexistent/e.pt"],
                                                    "similarity.embedder='/nonexistent/e.pt': no such"),
    "the matrix's embedder up a chain without one": (["+experiment=similarity_matrix", "data.classes=[ant,bee,cow]",
                                                      "similarity.embedder=source.source"],
                                                     "similarity.embedder=source.source names a model of the chain of "
                                                     "sources, and neither source.source.task nor source.source.weights"),
    "a class twice": (["data.classes=[ant,bee,ant]"], "data.classes=['ant', 'bee', 'ant'] names ant more than once"),
    "a transfer arm without a source": (["arm=dynamic"], "arm=dynamic starts from a source model (transfer_from=source), "
                                        "and neither source.task nor source.weights is set"),
    "the base's arm without a base": (["arm=base_finetune", "+source.task.positive=ant"],
                                      "arm=base_finetune starts from a source model (transfer_from=source.source), "
                                      "and neither source.source.task nor source.source.weights is set"),
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
    "a model.kwargs the constructor refuses": (["+model.kwargs.foo=1"], "model.kwargs={'zero_init_residual': True, "
                                               "'foo': 1}: resnet18 refuses them: ResNet.__init__() got an unexpected "
                                               "keyword argument 'foo'"),
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


@pytest.mark.parametrize("name, choices, hint", [
    ("per_clas", ["per_class", "seed"], " (did you mean per_class?)"),
    ("optimizer.learning_rate", ["optimizer.lr", "optimizer.weight_decay"], " (did you mean optimizer.lr?)"),
    ("max_epochs", ["data.seed", "trainer.max_epochs"], " (did you mean trainer.max_epochs?)"),
    ("colour", ["per_class", "seed"], ""),
])
def test_did_you_mean_finds_close_names_and_other_tools_words(name, choices, hint):
    from simfreeze.config import did_you_mean

    assert did_you_mean(name, choices) == hint


def one_error_line(result) -> str:
    """The whole of stderr, which must be exactly one ``error:`` line; exit status 2."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Hydra's own composition errors, which it would print as a multi-line report.
HYDRA_CASES = {
    "unknown group option": (["arm=nope"], "error: arm=nope: no such option; arm is one of base_finetune, depth, dynamic, "
                                           "finetune, head_only, scratch, source, staged, static45, threshold"),
    "unknown experiment": (["+experiment=nope"], "error: experiment=nope: no such option; experiment is one of "
                                                 "architectures, cat_to_dog, cat_to_dog_pretrained, depth_sweep, regimes, regimes_controls, "
                                                 "regimes_full, regimes_setup, similarity_matrix, similarity_study, staged"),
    "unknown launcher": (["hydra/launcher=nope"], "error: hydra/launcher=nope: no such option; hydra/launcher is one of"),
    "unknown key without +": (["data.per_clas=5"], "error: unknown key data.per_clas: the config has no such key"),
    "another tool's name for a key": (["optimizer.learning_rate=0.1"], "error: unknown key optimizer.learning_rate: the "
                                                                        "config has no such key (did you mean optimizer.lr?)"),
    "a key in the wrong section": (["epochs=3"], "error: unknown key epochs: the config has no such key (did you mean "
                                                 "trainer.max_epochs?)"),
    "a misspelt experiment": (["+experiment=cat2dog"], "error: experiment=cat2dog: no such option (did you mean "
                                                       "cat_to_dog?); experiment is one of"),
    "override syntax": (["data.per_class=[1"], "error: no viable alternative at input '[1'"),
    "unknown option in a sweep": (["-m", "arm=scratch,nope"], "error: arm=nope: no such option"),
    "bad key in one sweep job": (["-m", "seed=0,1", "+epochs=5"], "error: unknown key epochs; allowed: arm, cache"),
    "a job twice in a sweep": (["-m", "seed=0,1,0"], "error: the sweep's jobs 0 and 2 are the same run (seed=0)"),
}


@pytest.mark.parametrize("overrides, message", HYDRA_CASES.values(), ids=HYDRA_CASES.keys())
def test_hydra_errors_are_one_line_before_any_work(overrides, message, tmp_path):
    line = one_error_line(run_train(*overrides, cwd=tmp_path, check=False))
    assert line.startswith(message)
    assert not (tmp_path / "outputs").exists()  # no run or sweep directory made


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "broken.yaml").write_text("# @package _global_\nseed: [1, 2\n")
    result = run_train("--config-dir", str(tmp_path / "conf"), "+experiment=broken", cwd=tmp_path, check=False)
    line = one_error_line(result)
    assert line.startswith(f"error: {tmp_path / 'conf' / 'experiment' / 'broken.yaml'}, line 3, column 1: "
                           "while parsing a flow sequence") and line.endswith("(not valid YAML)")
    assert not (tmp_path / "outputs").exists()


def test_a_full_disk_is_named_in_one_line():
    import errno

    from simfreeze.jobs.job import disk_full_line

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/results.json")
    assert disk_full_line(full).startswith("no space left on the device writing /runs/x/results.json: free space")
    try:  # as a library wraps it
        try:
            raise full
        except OSError as err:
            raise RuntimeError("could not save") from err
    except RuntimeError as wrapped:
        assert disk_full_line(wrapped) == disk_full_line(full)
    assert disk_full_line(OSError(errno.EACCES, "Permission denied")) is None and disk_full_line(ValueError()) is None


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
                   "directory (the default is a new timestamp); to finish that sweep, run its own command again"
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["multirun.yaml"]

    # a sweep into a run's folder, a run into a sweep's: refused alike, nothing written
    line = one_error_line(run_train("-m", "seed=0,1", f"hydra.sweep.dir={run_dir}", cwd=tmp_path, check=False))
    assert line.startswith(f"error: hydra.sweep.dir='{run_dir}' already holds a run (results.json)")
    line = one_error_line(run_train(f"hydra.run.dir={sweep_dir}", cwd=tmp_path, check=False))
    assert line.startswith(f"error: hydra.run.dir='{sweep_dir}' already holds a sweep (multirun.yaml)")
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["multirun.yaml"]


def test_a_run_claims_its_directory_before_hydra_writes_there(tmp_path, capsys):
    """Hydra writes .hydra/ and train.log after its on_run_start callbacks: a second run started on
    the directory while the first imports must be refused there, not after rewriting the first's config."""
    from simfreeze.runs.preflight import Preflight

    run_dir = tmp_path / "run"
    config = compose_config([f"hydra.run.dir={run_dir}", f"source.cache_dir={tmp_path / 'sources'}"], hydra=True)
    Preflight().on_run_start(config)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # claimed, nothing else written yet
    with pytest.raises(SystemExit) as stop:
        Preflight().on_run_start(config)
    assert stop.value.code == 2 and sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]
    assert capsys.readouterr().err.startswith(f"error: hydra.run.dir='{run_dir}' already holds a run (checkpoints)")



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
    (["optimizer.lr=inf"], "error: optimizer.lr=inf must be a finite number"),
    (["-m", "seed=0,1", "scheduler.pct_start=1.5"],
     "error: scheduler: torch.optim.lr_scheduler.OneCycleLR refuses these values: Expected float between 0 and 1 "
     "pct_start, but got 1.5 (in the sweep's job"),
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


SMALL_CNN = ["model=small_cnn", "data.per_class=20", "data.image_size=32", "trainer.max_epochs=1"]
# Values that trained NaN weights and reported ok, or failed late with a traceback.
VALUE_CASES = {
    "an infinite learning rate": (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number"),
    "a negative infinite one": (["optimizer.lr=-inf"], "optimizer.lr=-inf must be a finite number"),
    "an infinite weight decay": (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf must be a finite number"),
    "a NaN pct_start": (["scheduler.pct_start=nan"], "scheduler.pct_start=nan must be a finite number"),
    "a NaN momentum": (["optimizer=sgd", "optimizer.momentum=nan"], "optimizer.momentum=nan must be a finite number"),
    "Adam's eps in fp16": (["trainer.precision=16-true"], "trainer.precision=16-true keeps the optimizer's state in fp16, "
                           "where optimizer.eps=1e-08 is 0"),
    "a NaN in data.mean": (["data.mean=[0.5,nan,0.5]"], "data.mean[1]=nan must be a finite number"),
    "a NaN in a source task": (["+source.task.val_fraction=nan"],
                               "source.task.val_fraction=nan must be a finite number"),
    "a NaN model argument": (["+model.kwargs.dropout=nan"], "model.kwargs.dropout=nan must be a finite number"),
    "an infinite cache budget": (["cache.budget_gb=inf"], "cache.budget_gb=inf must be a finite number"),
    "an infinite threshold": (["freeze.high=inf"], "freeze.high=inf must be a finite number"),
    "a std of 0": (["data.std=[0,0,0]"], "data.std=[0, 0, 0] must be a list of 3 numbers > 0"),
    "a std of two channels": (["data.std=[0.2,0.2]"], "data.std=[0.2, 0.2] must be a list of 3 numbers > 0"),
    "a source task's std of 0": (["+source.task.std=[0.2,0,0.2]"], "source.task.std=[0.2, 0, 0.2] must be a list of 3"),
    "a negative seed": (["seed=-1"], "seed=-1 must be an integer in [0, 2**32-1]"),
    "a seed above 2**32-1": (["seed=4294967296"], "seed=4294967296 must be an integer in [0, 2**32-1]"),
    "a negative split seed": (["data.seed=-3"], "data.seed=-3 must be an integer in [0, 2**32-1]"),
    "a source seed above 2**32-1": (["source.seed=4294967296"],
                                    "source.seed=4294967296 must be an integer in [0, 2**32-1] or null"),
    "a source task's negative split seed": (["+source.task.seed=-1"],
                                            "source.task.seed=-1 must be an integer in [0, 2**32-1]"),
    # Range checks by construction: the optimizer and the scheduler refuse these themselves.
    "pct_start above 1": (["scheduler.pct_start=1.5"], "scheduler: torch.optim.lr_scheduler.OneCycleLR refuses these "
                                                       "values: Expected float between 0 and 1 pct_start, but got 1.5"),
    "a negative momentum": (["optimizer=sgd", "optimizer.momentum=-1"],
                            "optimizer: torch.optim.SGD refuses these values: Invalid momentum value: -1"),
    "Nesterov without momentum": (["optimizer=sgd", "optimizer.momentum=0"],
                                  "optimizer: torch.optim.SGD refuses these values: Nesterov momentum requires a momentum"),
    "a beta of 1.5": (["+optimizer.betas=[0.9,1.5]"], "optimizer: torch.optim.AdamW refuses these values: Invalid beta "
                                                      "parameter at index 1: 1.5"),
    # Trainer arguments that train or validate nothing, or that Lightning refuses with a traceback.
    "no training batches": (["+trainer.limit_train_batches=0"],
                            "trainer.limit_train_batches=0 must be an integer ≥ 1, a fraction in (0, 1] or null "
                            "(0 would train nothing)"),
    "no validation batches": (["+trainer.limit_val_batches=0.0"], "trainer.limit_val_batches=0.0 must be an integer ≥ 1, "
                                                                  "a fraction in (0, 1] or null (0 would never validate"),
    "no test batches": (["+trainer.limit_test_batches=0"], "trainer.limit_test_batches=0 must be an integer ≥ 1"),
    "a negative limit": (["+trainer.limit_train_batches=-1"], "trainer.limit_train_batches=-1 must be an integer ≥ 1"),
    "a limit as text": (["+trainer.limit_val_batches=all"], 'trainer.limit_val_batches="all" must be an integer ≥ 1'),
    "a validation after the last epoch": (["+trainer.check_val_every_n_epoch=3"],
                                          "trainer.check_val_every_n_epoch=3 is more than trainer.max_epochs=1: the run "
                                          "would never validate"),
    "no validation cadence": (["+trainer.check_val_every_n_epoch=null"],
                              "trainer.check_val_every_n_epoch=null validates every trainer.val_check_interval batches"),
    "no steps": (["+trainer.max_steps=0"], "trainer.max_steps=0 must be -1 (no limit) or an integer ≥ 1"),
    "a model.kwargs the run sets": (["+model.kwargs.num_classes=5"], "model.kwargs may not set num_classes: the run sets"),
}


@pytest.mark.parametrize("overrides, message", VALUE_CASES.values(), ids=VALUE_CASES.keys())
def test_a_value_out_of_range_is_refused_in_one_line_naming_its_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        validate_config(compose_config([*SMALL_CNN, *overrides]))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not torch.cuda.is_initialized()  # the optimizer and scheduler are made on the CPU (the sweep preflight)


@pytest.mark.parametrize("overrides", [
    [], ["scheduler.pct_start=0.1"],  # 0/0 in OneCycleLR's phases at the 10 steps it is made with: not a range
    ["scheduler=none"], ["optimizer=sgd"], ["optimizer=sgd", "optimizer.nesterov=false", "optimizer.momentum=0"],
    ["data.mean=[0.5]", "data.std=[0.25]"], ["+trainer.limit_train_batches=0.5", "+trainer.limit_val_batches=3"],
    ["+trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=5"], ["+model.kwargs.dropout=0.5"],
], ids=str)
def test_values_in_range_pass(overrides):
    validate_config(compose_config([*SMALL_CNN, *overrides]))


@pytest.mark.parametrize("arch, kwargs, message", [
    ("small_cnn", {"foo": 1}, "model.kwargs={'foo': 1}: small_cnn refuses them: SmallCNN.__init__() got an unexpected "
                              "keyword argument 'foo'"),
    ("resnet18", {"replace_stride_with_dilation": [True]}, "model.kwargs={'replace_stride_with_dilation': [True]}: "
                                                           "resnet18 refuses them: replace_stride_with_dilation should be"),
])
def test_model_kwargs_the_constructor_refuses_are_one_line(arch, kwargs, message):
    from simfreeze.networks.build import build_network

    with pytest.raises(ConfigError) as caught:
        build_network(arch, 2, **kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# Runs that pass the checks but end without a result: each fails (never status ok) and leaves no
# checkpoint of NaN weights.
RESULTLESS = {
    "a last step that makes the weights NaN": (["optimizer.lr=1e38", "scheduler=none"], TrainingDiverged,
                                               "training diverged: the weights became NaN or infinite after the last "
                                               "step of epoch 1, whose loss was finite"),
    "weights whose validation loss is NaN": (["optimizer=sgd", "optimizer.lr=1e38", "scheduler=none"], TrainingDiverged,
                                             "training diverged: the validation loss became NaN or infinite after epoch 1"),
    "a validation interval the run never reaches": (["+trainer.check_val_every_n_epoch=null",
                                                     "+trainer.val_check_interval=5"], RunWithoutResult,
                                                    "the run never validated"),
    "a fraction of the training batches that is none": (["+trainer.limit_train_batches=0.01"], ConfigError,
                                                        "trainer.limit_train_batches: You requested to check 0.01"),
}


@pytest.mark.parametrize("overrides, error, message", RESULTLESS.values(), ids=RESULTLESS.keys())
def test_a_run_without_a_result_fails_and_keeps_no_nan_checkpoint(overrides, error, message, image_folder, tmp_path):
    cfg = compose_config([*SMALL_CNN, "data.classes=[ant,bee]", f"data.root={image_folder}", "trainer.accelerator=cpu",
                          "logger=none", "progress=lines", *overrides])
    validate_config(cfg)  # only the run can tell
    run_dir = tmp_path / "run"
    with pytest.raises(error) as caught:
        train.train(OmegaConf.to_container(cfg, resolve=True), run_dir)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints" / "best.ckpt").exists()
    if error is TrainingDiverged:  # nothing saved after the step that made them NaN
        assert not list(run_dir.rglob("*.ckpt"))


def test_a_fit_that_trained_no_step_has_no_result():
    from types import SimpleNamespace

    from simfreeze.runs.fit import check_fit_result

    run = SimpleNamespace(trainer=SimpleNamespace(global_step=0), best=SimpleNamespace(best_model_score=None),
                          module=SimpleNamespace(validated=False))
    with pytest.raises(RunWithoutResult, match="the run trained no step"):
        check_fit_result(run)


def test_a_large_sweep_is_checked_on_jobs_that_hold_every_value_of_every_axis():
    from simfreeze.runs.preflight import covering_jobs

    jobs = [[f"a={a}", f"b={b}", f"c={c}"] for a in range(3) for b in range(4) for c in range(2)]
    kept = covering_jobs(jobs)
    assert len(kept) <= 3 + 4 + 2 and kept[0] == jobs[0]
    assert {o for job in kept for o in job} == {o for job in jobs for o in job}


def test_help_fits_a_screen_and_names_every_experiment(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    lines = result.stdout.rstrip().splitlines()
    assert len(lines) <= 40, result.stdout
    experiments = {path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml")} - {"regimes_setup"}
    assert all(re.search(rf"\b{name}\b", result.stdout) for name in experiments), result.stdout
    assert "$CIFAR10_ROOT" in result.stdout and "--cfg job" in result.stdout  # where data come from; the full config


def test_a_value_error_comes_before_torch_and_lightning_are_imported(tmp_path):
    # Importing them takes 5 s or more; a wrong value should fail as fast as an unknown key.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "train", "optimizer.lr=-1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "error: optimizer.lr=-1 must be a number > 0" in result.stderr
    assert not {"torch", "lightning"} & imported
