"""End to end: `python -m train` in a fresh process, from a directory that is not the repository."""

import csv
import json

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_train

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "data.val_fraction=0.25", "data.batch_size=16",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "progress=lines"]


def test_tiny_run_writes_results_logs_and_checkpoints(image_folder_with_test, tmp_path):
    run_dir = tmp_path / "run"
    # As on a CPU without native bf16, whatever this one has: precision=auto must then pick fp32.
    result = run_train(*TINY, "data.classes=[ant,bee]", "trainer.accelerator=cpu", f"data.root={image_folder_with_test}",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"SIMFREEZE_NATIVE_BF16": "0"})
    results = json.loads((run_dir / "results.json").read_text())
    assert results["images"] == {"train": 30, "val": 10, "test": 12}
    # accuracies are over every image of their split: whole counts of 10 val and 12 test images
    assert round(results["best_val_acc"] * 10, 6).is_integer() and round(results["test_acc"] * 12, 6).is_integer()
    assert results["best_val_acc"] >= results["final_val_acc"]
    assert results["fit_seconds"] >= 2 * results["mean_epoch_seconds"]  # the fit holds both epochs
    assert results["epochs"] == 2 and results["seed"] == 0
    assert results["trainable_parameters"] == results["total_parameters"] > 1_000_000
    assert results["precision"] == "32-true" and results["device"].startswith("cpu") and "no native bf16" in results["device"]
    assert results["reproducibility"].startswith("bit-identical")
    assert results["precision_phases"] == {"similarity": None, "cache_fill": None, "training": "32-true", "fp32_convs": []}
    assert set(results["versions"]) >= {"torch", "torchvision", "lightning", "hydra"}
    # TensorBoard's run is named by the arm and the seed; CSVLogger's metrics.csv has a row per epoch.
    events = EventAccumulator(str(run_dir / "tensorboard" / "arm=scratch" / "seed=0"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/acc", "val/acc_best", "train/fit_seconds", "test/acc"} <= set(events.Tags()["scalars"])
    assert "epoch" not in events.Tags()["scalars"]  # HParams would show it as the first metric column
    assert max(e.value for e in events.Scalars("val/acc")) == pytest.approx(results["best_val_acc"])
    assert "arm: scratch" in (run_dir / "tensorboard" / "arm=scratch" / "seed=0" / "hparams.yaml").read_text()
    hparams = hparams_of(events)
    assert hparams["arm"].string_value == "scratch" and hparams["seed"].string_value == "0"
    assert hparams["L_freeze"].string_value == "0"  # an integer shown as one, not 0.000
    assert "S" not in hparams  # no similarity: no stand-in value that reads as a cosine
    columns = experiment_of(events)  # ... but the column, the same in every run's experiment summary
    assert [h.name for h in columns.hparam_infos] == ["arm", "policy", "S", "L_freeze", "seed", "task"]
    assert [m.name.tag for m in columns.metric_infos] == ["val/acc_best", "test/acc", "train/fit_seconds"]
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")] == [e.value for e in events.Scalars("val/acc")]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((run_dir / "split.json").read_text())["per_class"] == 20
    assert "[simfreeze]" in result.stdout and "epoch 2/2" in result.stdout
    # The console holds progress and results; train.log also Lightning's device lines, with times.
    log = (run_dir / "train.log").read_text()
    assert "epoch 2/2" in log and "[simfreeze] scratch" in log and "GPU available" in log
    assert "GPU available" not in result.stdout and "Trainable params" not in result.stdout + result.stderr
    assert len(result.stdout.splitlines()) <= 4, result.stdout  # 2 epoch lines, the test line, the result line
    line = next(line for line in result.stdout.splitlines() if line.startswith("[simfreeze]"))
    assert len(line.split(" → ")[0]) <= 120 and f"test/acc={results['test_acc']:.4f}" in line  # fits 160 with its folder
    assert "final val/acc=" in log and "img/s" in log  # the rest of the result, in train.log
    assert "ModelCheckpoint" not in result.stderr  # no warning the tool itself causes (testing "best" with two)


def hparams_of(events: EventAccumulator) -> dict:
    """A run's HParams values as TensorBoard reads them."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")
    return dict(HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams)


def experiment_of(events: EventAccumulator):
    """A run's HParams experiment summary: the tab's columns."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_train("--cfg", "job", "data.per_class=123", cwd=tmp_path)
    assert "per_class: 123" in result.stdout and "arch: resnet50" in result.stdout


def test_real_cifar10_run(cifar10_root, tmp_path):
    """The paper's cat/dog task on the real CIFAR-10 JPEGs, scaled down: ResNet-50, 1 epoch."""
    run_dir = tmp_path / "real"
    run_train("data.per_class=40", "trainer.max_epochs=1", "progress=lines", f"data.root={cifar10_root}",
              f"hydra.run.dir={run_dir}", cwd=tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["images"] == {"train": 64, "val": 16}
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["files"]["train"]) == ["cat", "dog"]
    assert all(f.startswith("train/cat/") for f in split["files"]["val"]["cat"])


def test_a_diverged_run_fails_with_one_line_and_no_results(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(*TINY, "data.classes=[ant,bee]", "optimizer.lr=1e9", "scheduler=none", f"data.root={image_folder}",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "error: training diverged" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (run_dir / "results.json").exists()
    assert "training diverged" in (run_dir / "train.log").read_text()  # the log says why the run stopped


def test_a_sweep_job_whose_last_step_made_the_weights_nan_is_failed(image_folder, tmp_path):
    """One step per epoch: its loss is finite, its update (AdamW at lr 1e38) makes the weights NaN.
    This job reported ok, with NaN in 18 of 24 tensors of best.ckpt and last.ckpt."""
    sweep_dir = tmp_path / "sweep"
    result = run_train("-m", "model=small_cnn", "data.per_class=20", "data.image_size=32", "trainer.max_epochs=1",
                       "data.classes=[ant,bee]", "optimizer.lr=1e38", "scheduler=none", "seed=0", "progress=lines",
                       f"data.root={image_folder}", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, check=False)
    results = json.loads((sweep_dir / "0" / "results.json").read_text())
    message = "training diverged: the weights became NaN or infinite after the last step of epoch 1"
    assert results["status"] == "failed" and message in results["error"], results
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not list((sweep_dir / "0").rglob("*.ckpt"))  # no best.ckpt or last.ckpt of NaN weights


def test_a_long_epoch_prints_progress_lines(caplog):
    from types import SimpleNamespace

    from simfreeze.runs.progress import EpochLines

    lines = EpochLines(every_s=0.0)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=4, num_training_batches=400,
                              callback_metrics={"train/loss": 1.2345})
    caplog.set_level("INFO", logger="simfreeze.progress")
    lines.on_train_epoch_start(trainer, None)
    lines.on_train_batch_end(trainer, None, None, None, 119)
    assert caplog.messages == ["epoch 1/4  batch 120/400  train/loss 1.2345  (0.0 s)"]
    caplog.clear()
    quiet = EpochLines()  # every 30 s: not after a moment
    quiet.on_train_epoch_start(trainer, None)
    quiet.on_train_batch_end(trainer, None, None, None, 0)
    assert caplog.messages == []


def test_verbose_brings_lightnings_details_back_to_the_console(image_folder, tmp_path):
    result = run_train(*TINY, "data.classes=[ant,bee]", "trainer.accelerator=cpu", "trainer.max_epochs=1", "verbose=true",
                       f"data.root={image_folder}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "GPU available" in result.stdout and "Trainable params" in result.stdout and "epoch 1/1" in result.stdout


def test_cfg_job_of_an_experiment_says_what_its_jobs_sweep(tmp_path):
    result = run_train("+experiment=cat_to_dog", "--cfg", "job", cwd=tmp_path)
    assert "arm: scratch" in result.stdout  # the composition before the sweep…
    assert "#   arm: source,scratch,dynamic,static45,head_only,finetune" in result.stdout  # …and what the jobs set
    assert "This is a sweep" not in run_train("--cfg", "job", cwd=tmp_path).stdout


def test_a_reader_that_closes_the_console_stops_only_the_console(image_folder, tmp_path):
    """``python -m train … | head -1``: the run goes on quietly (it printed a logging traceback per
    line before), and train.log and results.json hold everything."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "train", "model=small_cnn", "data.image_size=32", "data.per_class=12",
               "trainer.max_epochs=3", "progress=lines", "test=false", "data.classes=[ant,bee]",
               f"data.root={image_folder}", f"hydra.run.dir={run_dir}"]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline().startswith("epoch 1/3")
    run.stdout.close()  # as head does after its line
    stderr = run.stderr.read()
    assert run.wait(timeout=300) == 0 and stderr == ""
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    assert "epoch 3/3" in (run_dir / "train.log").read_text()
