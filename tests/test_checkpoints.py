"""A run's checkpoints (docs/outputs.md, "What a run leaves"): ``last.ckpt`` every ``checkpoint.last_every_n_epochs``
epochs, at the end and when the run is stopped (SIGTERM, Ctrl-C, an error), and resumable from each;
``best.ckpt`` and ``last.ckpt`` without the frozen prefix, which a restore takes back from the
network as rebuilt after checking its digest."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import train
from simfreeze.errors import ConfigError, WeightsError
from simfreeze.method.freeze import freeze_leading, frozen_state_from, frozen_state_keys, leave_out_frozen
from simfreeze.networks.build import FROZEN_STATE, read_state_dict
from simfreeze.networks.layers import layer_map
from simfreeze.runs.module import Classifier
from tests.helpers import REPO, sgd_classifier

# 2 classes × 16 training images, batches of 8: 4 steps an epoch.
TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "data.classes=[ant,bee]",
        "data.batch_size=8", "progress=lines", "trainer.accelerator=cpu", "trainer.precision=32-true"]
TRANSFER = ["arm=static45", "freeze.k=9", "+source.task.positive=ant", "data.positive=bee", "trainer.max_epochs=2"]


def config(folder, *overrides) -> dict:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, f"data.root={folder}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def fit(folder, run_dir, *overrides) -> dict:
    return train.train(config(folder, *overrides), run_dir)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def record_saves(monkeypatch) -> list[tuple[str, int]]:
    """Every checkpoint write of the fits that follow, as (file name, global step)."""
    import lightning as L

    saves, original = [], L.Trainer.save_checkpoint

    def save_checkpoint(trainer, filepath, *args, **kwargs):
        saves.append((os.path.basename(filepath), trainer.global_step))
        return original(trainer, filepath, *args, **kwargs)
    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_checkpoint)
    return saves


@pytest.mark.parametrize("every, epochs, last_saves", [
    (2, 3, [8, 12]),   # after epoch 2, and at the end (3 is no multiple of 2)
    (1, 2, [4, 8]),    # every epoch; the end is saved already
    (None, 2, [8]),    # the default (10): a short run writes it once, at the end
], ids=["every 2 of 3", "every epoch", "default"])
def test_last_ckpt_is_written_every_n_epochs_and_at_the_end(image_folder, tmp_path, monkeypatch, every, epochs, last_saves):
    saves = record_saves(monkeypatch)
    cadence = [] if every is None else [f"checkpoint.last_every_n_epochs={every}"]
    fit(image_folder, tmp_path / "run", f"trainer.max_epochs={epochs}", *cadence)
    assert [step for name, step in saves if name == "last.ckpt"] == last_saves
    last, best = (load(tmp_path / "run" / "checkpoints" / name) for name in ("last.ckpt", "best.ckpt"))
    assert last["global_step"] == last_saves[-1] and "optimizer_states" in last
    # scratch: nothing frozen, nothing left out
    assert FROZEN_STATE not in last and FROZEN_STATE not in best
    assert set(last["state_dict"]) == set(best["state_dict"]) >= {"net.conv1.weight", "net.bn1.running_mean"}


def test_checkpoint_keep_false_deletes_the_checkpoints_once_the_results_are_written(image_folder_with_test, tmp_path):
    results = fit(image_folder_with_test, tmp_path / "run", *TRANSFER, "checkpoint.keep=false",
                  f"source.cache_dir={tmp_path / 'sources'}", "trainer.max_epochs=1")
    assert results["test_acc"] is not None and (tmp_path / "run" / "results.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the source stage keeps its own: the next stage starts from its last.ckpt
    assert list((tmp_path / "sources").glob("*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def transfer_run(image_folder_with_test, tmp_path_factory):
    """An uninterrupted transfer run with 9 frozen layers (and its source, cached for the others)."""
    root = tmp_path_factory.mktemp("transfer")
    overrides = [*TRANSFER, f"source.cache_dir={root / 'sources'}"]
    results = fit(image_folder_with_test, root / "whole", *overrides)
    return root, overrides, results


def expected_frozen_keys() -> set[str]:
    """From the layer map: the first 9 layers' parameters and their BatchNorms' buffers."""
    net = torchvision.models.resnet18(num_classes=2)
    modules = [net.get_submodule(m) for layer in layer_map(net, "resnet18").layers[:9] for m in layer.modules]
    names = {module: name for name, module in net.named_modules()}
    return {f"net.{names[m]}.{n}" for m in modules
            for n, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))}


def test_the_frozen_prefix_is_left_out_of_both_checkpoints_and_restored_on_load(transfer_run, image_folder_with_test):
    root, overrides, results = transfer_run
    assert results["l_freeze"] == 9 and results["test_acc"] is not None  # tested on best.ckpt, restored
    source = load(next((root / "sources").glob("*/checkpoints/last.ckpt")))["state_dict"]  # whole: a source's
    frozen = expected_frozen_keys()
    assert "net.bn1.running_var" in frozen and "net.layer2.0.downsample.1.running_mean" in frozen
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = load(root / "whole" / "checkpoints" / name)
        record, state = checkpoint[FROZEN_STATE], checkpoint["state_dict"]
        assert set(record["keys"]) == frozen and not frozen & set(state)
        assert set(state) | frozen == set(source) and "net.layer4.1.conv2.weight" in state
        # restored from a network rebuilt from the source, frozen as the run froze it
        net = torchvision.models.resnet18(num_classes=2)
        net.load_state_dict({k.removeprefix("net."): v for k, v in source.items()})
        freeze_leading(net, layer_map(net, "resnet18"), 9)
        module = sgd_classifier(net)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])  # strict: nothing missing
        assert all(torch.equal(checkpoint["state_dict"][k], source[k]) for k in frozen)
    # such a checkpoint is no whole set of initial weights: refused in one line
    with pytest.raises(WeightsError, match=r"leaves out its frozen prefix \(\d+ tensors.*keep_frozen=true"):
        read_state_dict(root / "whole" / "checkpoints" / "best.ckpt")


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "error"])
def test_a_stopped_run_writes_last_ckpt_and_resumes_from_it(transfer_run, image_folder_with_test, tmp_path,
                                                            monkeypatch, how):
    root, overrides, whole = transfer_run
    saves = record_saves(monkeypatch)

    def stop_at_step_6(self, outputs, batch, batch_idx):  # in epoch 2 of 2, the default cadence saved nothing yet
        if self.trainer.global_step == 6:
            if how == "sigterm":  # as a scheduler does: Lightning stops after this batch
                os.kill(os.getpid(), signal.SIGTERM)
            elif how == "ctrl-c":
                raise KeyboardInterrupt
            else:
                raise RuntimeError("a crash")
    monkeypatch.setattr(Classifier, "on_train_batch_end", stop_at_step_6, raising=False)
    with pytest.raises(RuntimeError if how == "error" else SystemExit):  # Lightning ends Ctrl-C and SIGTERM with exit
        fit(image_folder_with_test, tmp_path / "stopped", *overrides)
    monkeypatch.undo()
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert [step for name, step in saves if name == "last.ckpt"] == [6]
    checkpoint = load(last)
    assert checkpoint["global_step"] == 6 and FROZEN_STATE in checkpoint
    resumed = fit(image_folder_with_test, tmp_path / "resumed", *overrides, f"ckpt_path={last}")
    assert resumed["status"] == "ok" and resumed["epochs"] == whole["epochs"] == 2
    assert load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 8  # the same steps in all


def test_a_rebuilt_prefix_that_differs_is_refused_in_one_line(transfer_run, image_folder_with_test, tmp_path):
    import shutil

    root, overrides, _ = transfer_run
    sources = shutil.copytree(root / "sources", tmp_path / "sources")  # as if the source had been trained again
    cached = next(sources.glob("*/checkpoints/last.ckpt"))
    checkpoint = load(cached)
    checkpoint["state_dict"]["net.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(checkpoint, cached)
    last = root / "whole" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as caught:
        fit(image_folder_with_test, tmp_path / "resumed", *overrides, f"source.cache_dir={sources}", f"ckpt_path={last}")
    message = str(caught.value)
    assert "\n" not in message and "frozen prefix" in message and "digest mismatch" in message and str(last) in message
    assert not (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()  # a refused restore writes nothing


def test_a_resume_refused_in_place_changes_nothing_in_the_run_directory(transfer_run, image_folder_with_test, tmp_path):
    import shutil

    from tests.helpers import run_train

    root, overrides, _ = transfer_run
    run_dir = shutil.copytree(root / "whole", tmp_path / "run")
    # a sweep job recorded as failed (one that finished is not resumed at all)
    (run_dir / "results.json").write_text('{"status": "failed", "error": "RuntimeError: a crash"}\n')
    sources = shutil.copytree(root / "sources", tmp_path / "sources")  # as if the source had been trained again
    cached = next(sources.glob("*/checkpoints/last.ckpt"))
    checkpoint = load(cached)
    checkpoint["state_dict"]["net.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(checkpoint, cached)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = [*overrides, f"source.cache_dir={sources}", f"ckpt_path={last}"]

    def files(skip=()):
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
                if p.is_file() and p.relative_to(run_dir).parts[0] not in skip}
    before = files()
    assert {"results.json", "csv/metrics.csv", "split.json", "plan.json", "checkpoints/last.ckpt"} <= set(before)
    assert any(name.startswith("tensorboard/") for name in before)
    with pytest.raises(ConfigError, match="digest mismatch"):
        fit(image_folder_with_test, run_dir, *resume)
    assert files() == before
    # the command line: one error line, exit status 2; Hydra writes .hydra/ and train.log for every run it starts
    result = run_train(*TINY, f"data.root={image_folder_with_test}", *resume, f"hydra.run.dir={run_dir}",
                       cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the checkpoint") and "Traceback" not in result.stderr
    assert files(skip={".hydra", "train.log"}) == before


def test_sigterm_ends_python_m_train_with_143_and_a_resume_line(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "train", *TINY, f"data.root={image_folder}", "trainer.max_epochs=50",
                                f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, deadline = [], time.monotonic() + 300
    for line in process.stdout:  # the first epoch's line: the fit (and Lightning's handler) is on
        output.append(line)
        if line.startswith("epoch 1/50") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    output.append(process.communicate(timeout=300)[0])
    text = "".join(output)
    assert process.returncode == 128 + signal.SIGTERM, text
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"resume with ckpt_path={last}" in text and load(last)["global_step"] >= 4
    assert not (run_dir / "results.json").exists()


def test_frozen_state_keys_and_their_digest():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.BatchNorm2d(4, affine=False))
    for module in net[:2]:
        module.requires_grad_(False)
    keys = frozen_state_keys(net)
    assert keys == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                    "1.num_batches_tracked"]  # a module without parameters keeps its buffers: not held in eval
    state = net.state_dict()
    record = leave_out_frozen(state, keys)
    assert not set(keys) & set(state) and json.loads(json.dumps(record)) == record  # primitives only
    assert record["dtypes"][0] == "float32" and record["dtypes"][-1] == "int64"
    # e.g. under 64-true the checkpoint holds float64: what is put back is in the dtypes it was saved in
    as_saved = net.state_dict()
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in as_saved.items()}
    restored = frozen_state_from(record, doubled)
    assert all(restored[k].dtype == as_saved[k].dtype and torch.equal(restored[k], as_saved[k]) for k in keys)
    with torch.no_grad():
        net[1].running_mean += 1
    with pytest.raises(ConfigError, match=r"^the checkpoint leaves out its frozen prefix \(7 tensors\).*digest mismatch"):
        frozen_state_from(record, net.state_dict())
    with pytest.raises(ConfigError, match=r"has no 0.weight \(and 6 more\): another architecture"):
        frozen_state_from(record, {})


def test_the_checkpoint_settings_are_checked_and_change_neither_a_source_key_nor_the_run():
    from simfreeze.config import resume_differences, run_settings, validate_config
    from simfreeze.runs.sources import source_config, source_key
    from tests.helpers import compose_config

    for override, message in [("checkpoint.last_every_n_epochs=-1", "checkpoint.last_every_n_epochs=-1 must be an integer ≥ 0"),
                              ("checkpoint.last_every_n_epochs=1.5", "must be an integer ≥ 0"),
                              ("checkpoint.keep_frozen=sometimes", 'checkpoint.keep_frozen="sometimes" must be true or false'),
                              ("+checkpoint.every=3", "unknown key checkpoint.every")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate_config(compose_config([override]))
    staged = OmegaConf.to_container(compose_config(["+experiment=staged"]), resolve=True)
    other = OmegaConf.to_container(compose_config(["+experiment=staged", "checkpoint.last_every_n_epochs=1",
                                                   "checkpoint.keep_frozen=true"]), resolve=True)
    # a source stage's last.ckpt is the next stage's initial weights: whole
    assert source_config(staged)["checkpoint"]["keep_frozen"] is True
    without = {k: v for k, v in source_config(staged).items() if k != "checkpoint"}  # caches made before the section
    assert source_key(source_config(staged)) == source_key(source_config(other)) == source_key(without)
    assert resume_differences(run_settings(staged), other) is None  # another cadence resumes the same run
