"""A resume continues its run and its files, or changes nothing (docs/outputs.md, "What a run leaves"): the
metrics file and the clock go on over both parts, a refused resume or one of a finished run leaves
the directory as it was, a failed checkpoint write keeps the previous one, a swapped data root is
refused, and the stop hints point where the run can go on."""

import csv
import errno
import os
import shutil
import signal

import pytest
import torch

from simfreeze.errors import ConfigError, DiskFull
from simfreeze.runs.module import Classifier
from tests.helpers import make_image_folder, run_train
from tests.test_checkpoints import TINY, TRANSFER, fit, load

# 2 classes × 16 training images, batches of 8: 4 steps an epoch, 2 epochs, last.ckpt after each.
TWO_EPOCHS = ["trainer.max_epochs=2", "checkpoint.last_every_n_epochs=1", "trainer.log_every_n_steps=1"]


def snapshot(run_dir, skip=()) -> dict[str, bytes]:
    """Every file under ``run_dir`` (but those whose first path part is in ``skip``) with its bytes."""
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*"))
            if path.is_file() and path.relative_to(run_dir).parts[0] not in skip}


def metric_rows(run_dir) -> list[dict]:
    """metrics.csv's rows less the run's final hparams (its fit seconds differ between runs)."""
    rows = [{k: v for k, v in row.items() if k not in ("val/acc_best", "train/fit_seconds")}
            for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv"))]
    return [row for row in rows if any(v for k, v in row.items() if k not in ("step", "epoch"))]


def shape(rows: list[dict]) -> list[tuple]:
    """Each row's step, epoch and which metrics it holds."""
    return [(row["step"], row["epoch"], tuple(sorted(k for k, v in row.items() if v and k not in ("step", "epoch"))))
            for row in rows]


def clock_state(checkpoint: dict) -> dict:
    return checkpoint["callbacks"]["FitClock"]


@pytest.fixture(scope="module")
def whole(image_folder, tmp_path_factory):
    """An uninterrupted run: the rows a resumed one must end with."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    return run_dir, fit(image_folder, run_dir, *TWO_EPOCHS)


def stop_at_step_6(monkeypatch, stop) -> None:
    def on_train_batch_end(self, outputs, batch, batch_idx):  # in epoch 2 of 2
        if self.trainer.global_step == 6:
            stop(self.trainer)
    monkeypatch.setattr(Classifier, "on_train_batch_end", on_train_batch_end, raising=False)


def killed_at_step_6(monkeypatch, root, run_dir, *overrides, flush: bool = False) -> None:
    """``fit`` into ``run_dir``, ended in epoch 2 of 2 as SIGKILL would end it: no stop checkpoint, so
    last.ckpt is epoch 1's (``flush``: the loggers wrote what they held first)."""
    from simfreeze.runs.resume import LastCheckpoint

    def killed(trainer):
        for logger in trainer.loggers if flush else ():
            logger.save()
        raise RuntimeError("killed")
    stop_at_step_6(monkeypatch, killed)
    monkeypatch.setattr(LastCheckpoint, "on_exception", lambda *args: None)
    with pytest.raises(RuntimeError, match="killed"):
        fit(root, run_dir, *overrides)
    monkeypatch.undo()


def test_a_run_killed_outright_resumes_in_place_with_its_metrics_and_no_row_twice(whole, image_folder, tmp_path,
                                                                                 monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole_dir, _ = whole
    run_dir = tmp_path / "run"
    killed_at_step_6(monkeypatch, image_folder, run_dir, *TWO_EPOCHS, flush=True)  # after the loggers flushed step 4
    last = run_dir / "checkpoints" / "last.ckpt"
    first = load(last)
    assert first["global_step"] == 4  # epoch 1's; step 4 is in metrics.csv only
    assert "4" in {row["step"] for row in metric_rows(run_dir)}

    def tensorboard_steps(run_dir):
        events = EventAccumulator(str(run_dir / "tensorboard" / "arm=scratch" / "seed=0")).Reload()
        return [event.step for event in events.Scalars("train/loss")]
    assert tensorboard_steps(run_dir) == list(range(5))
    results = fit(image_folder, run_dir, *TWO_EPOCHS, f"ckpt_path={last}")
    # resumed between epochs: the same computation as the whole run's, so the same rows, each once
    assert metric_rows(run_dir) == metric_rows(whole_dir)
    assert tensorboard_steps(run_dir) == tensorboard_steps(whole_dir) == list(range(8))  # the stopped part's step 4 hidden
    clock, first_part = clock_state(load(last)), clock_state(first)
    assert len(clock["epoch_seconds"]) == 2 and clock["train_images"] == 2 * 32
    assert clock["epoch_seconds"][0] == first_part["epoch_seconds"][0]  # the first part's epoch, carried over
    assert results["fit_seconds"] >= first_part["fit_seconds"] + clock["epoch_seconds"][1] - 1e-3


def test_a_run_stopped_within_an_epoch_resumes_in_place_with_its_metrics_and_true_timings(whole, image_folder,
                                                                                        tmp_path, monkeypatch):
    whole_dir, _ = whole
    run_dir = tmp_path / "run"
    stop_at_step_6(monkeypatch, lambda trainer: os.kill(os.getpid(), signal.SIGTERM))  # a scheduler's stop
    with pytest.raises(SystemExit):
        fit(image_folder, run_dir, *TWO_EPOCHS)
    monkeypatch.undo()
    last = run_dir / "checkpoints" / "last.ckpt"
    first = load(last)
    assert first["global_step"] == 6
    first_rows = metric_rows(run_dir)
    results = fit(image_folder, run_dir, *TWO_EPOCHS, f"ckpt_path={last}")
    rows = metric_rows(run_dir)
    assert rows[:len(first_rows)] == first_rows  # the first part's rows kept as they were
    # the rest of epoch 2 draws another batch order: other values, the same rows
    assert shape(rows) == shape(metric_rows(whole_dir))
    assert results["mean_epoch_seconds"] < results["fit_seconds"]
    clock, first_part = clock_state(load(last)), clock_state(first)
    assert first_part["in_epoch_seconds"] > 0 and first_part["train_images"] == 32 + 16
    assert len(clock["epoch_seconds"]) == 2 and clock["train_images"] == 2 * 32  # epoch 2 counted once, whole
    assert clock["epoch_seconds"][1] >= first_part["in_epoch_seconds"]  # both pieces of epoch 2
    assert results["fit_seconds"] >= first_part["fit_seconds"]
    assert results["mean_epoch_seconds"] == pytest.approx(sum(clock["epoch_seconds"]) / 2, abs=1e-3)
    assert results["train_images_per_second"] == pytest.approx(64 / sum(clock["train_seconds"]), abs=0.1)


def numbered_folder(root):
    """Two classes whose files have the same names in each folder (0000.png, …), as CIFAR-10's."""
    make_image_folder(root, {"ant": 20, "bee": 20})
    for folder in (root / "train").iterdir():
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"{i:04d}.png")
    return root


def test_a_resume_on_a_data_root_whose_images_differ_is_refused_and_a_moved_one_resumes(tmp_path, monkeypatch):
    original = numbered_folder(tmp_path / "original")
    run_dir = tmp_path / "run"
    settings = ["data.classes=[ant,bee]", *TWO_EPOCHS]  # stopped in epoch 2: last.ckpt holds epoch 1
    killed_at_step_6(monkeypatch, original, run_dir, *settings)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = snapshot(run_dir)
    swapped = shutil.copytree(original, tmp_path / "swapped")
    (swapped / "train" / "ant").rename(swapped / "train" / "tmp")
    (swapped / "train" / "bee").rename(swapped / "train" / "ant")
    (swapped / "train" / "tmp").rename(swapped / "train" / "bee")
    with pytest.raises(ConfigError, match=f"^ckpt_path: data.root='{swapped}' holds other images") as caught:
        fit(swapped, run_dir, *settings, f"ckpt_path={last}")
    assert "\n" not in str(caught.value)
    assert snapshot(run_dir) == before
    moved = shutil.move(original, tmp_path / "moved")  # the same images elsewhere: the same run
    assert fit(moved, tmp_path / "resumed", *settings, f"ckpt_path={last}")["status"] == "ok"


def test_resuming_a_finished_run_says_so_exits_0_and_writes_nothing(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    fit(image_folder, run_dir, "trainer.max_epochs=1")
    before = snapshot(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    result = run_train(*TINY, f"data.root={image_folder}", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
                       f"ckpt_path={last}", cwd=tmp_path, check=False)  # a requeued job
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"simfreeze: {run_dir} already finished (results.json); nothing to do — start a "
                                     f"new run without ckpt_path to train again")
    assert snapshot(run_dir) == before  # no .hydra/, no train.log either


def failing_save(monkeypatch, when) -> None:
    """``torch.save`` that, ``when(obj)``, writes half of the checkpoint and fails as a full disk does."""
    import io

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if not when(obj):
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_leaves_no_temporary(image_folder, tmp_path,
                                                                                      monkeypatch):
    run_dir = tmp_path / "run"
    steps = []

    def second_last_ckpt(obj):  # last.ckpt holds the optimizer's state, best.ckpt weights only
        steps.append(obj.get("global_step"))
        return "optimizer_states" in obj and obj["global_step"] == 8
    failing_save(monkeypatch, second_last_ckpt)
    with pytest.raises(DiskFull) as caught:
        fit(image_folder, run_dir, *TWO_EPOCHS)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert str(caught.value) == f"no space left on device writing {last}; the previous one is kept"
    monkeypatch.undo()
    assert 8 in steps and load(last)["global_step"] == 4  # epoch 1's, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    # the first write of a file: nothing is left, and nothing said to be kept
    from simfreeze.runs.resume import AtomicCheckpointIO

    failing_save(monkeypatch, lambda obj: True)
    with pytest.raises(DiskFull, match=r"^no space left on device writing \S+/new.ckpt$"):
        AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(4)}, tmp_path / "new" / "new.ckpt")
    assert list((tmp_path / "new").iterdir()) == []


def test_a_source_stage_stopped_says_it_is_trained_again_not_where_to_resume(image_folder, tmp_path, monkeypatch,
                                                                             caplog):
    def crash(trainer):
        raise RuntimeError("a crash")
    stop_at_step_6(monkeypatch, crash)
    caplog.set_level("WARNING", logger="simfreeze")
    with pytest.raises(RuntimeError, match="a crash"):  # in the source stage, the first fit
        fit(image_folder, tmp_path / "run", *TRANSFER, f"source.cache_dir={tmp_path / 'sources'}")
    stops = [m for m in caplog.messages if m.startswith("stopped (RuntimeError)")]
    assert stops == ["stopped (RuntimeError) in epoch 2 at step 6 of a source stage: its staging folder is discarded, "
                     "and the stage is trained again when the run is started again"]
    assert not list((tmp_path / "sources").glob("*/checkpoints"))  # no staging folder, no cached stage


def test_rows_before_keeps_the_rows_before_a_step_as_they_were():
    from simfreeze.runs.loggers import rows_before

    text = "epoch,step,train/loss\r\n0,0,0.5\r\n0,3,0.25\r\n1,4,0.125\r\n"
    assert rows_before(text, 4) == "epoch,step,train/loss\r\n0,0,0.5\r\n0,3,0.25\r\n"
    assert rows_before(text, 9) == text and rows_before("", 4) == ""
    assert rows_before(text + "1,5,0.1", 9) == rows_before(text + "1,", 9) == text  # cut short by a kill


def test_resuming_a_finished_checkpoint_elsewhere_says_nothing_was_left_to_train(image_folder, tmp_path):
    from simfreeze.errors import RunWithoutResult

    fit(image_folder, tmp_path / "run", "trainer.max_epochs=1")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(RunWithoutResult, match="trained all trainer.max_epochs=1 epochs already, so nothing was left"):
        fit(image_folder, tmp_path / "again", "trainer.max_epochs=1", f"ckpt_path={last}")



def test_a_job_of_a_sweep_run_again_is_kept_resumed_or_run_afresh(tmp_path):
    import json

    from omegaconf import OmegaConf

    from simfreeze.config import settings_digest
    from simfreeze.errors import RunDirInUse
    from simfreeze.runs.resume import earlier_attempt
    from tests.helpers import compose_config

    cfg = OmegaConf.to_container(compose_config(["model=small_cnn"]), resolve=True)
    job = tmp_path / "3"
    (job / ".hydra").mkdir(parents=True)
    assert earlier_attempt(job, cfg) == ("new", None)  # Hydra's own files only
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert earlier_attempt(job, cfg) == ("resume", None)  # killed: no results.json, a last.ckpt
    (job / "results.json").write_text(json.dumps({"status": "failed"}))
    (job / "split.json").write_text("{}")
    assert earlier_attempt(job, cfg) == ("fresh", None)  # failed: its files go, Hydra's stay
    assert sorted(p.name for p in job.iterdir()) == [".hydra"]
    done = {"status": "ok", "best_val_acc": 0.5, "settings_digest": settings_digest(cfg)}
    (job / "results.json").write_text(json.dumps(done))
    assert earlier_attempt(job, cfg) == ("done", done)
    other = OmegaConf.to_container(compose_config(["model=small_cnn", "optimizer.lr=0.1"]), resolve=True)
    with pytest.raises(RunDirInUse, match="holds a finished job of other settings"):
        earlier_attempt(job, other)
    assert json.loads((job / "results.json").read_text()) == done  # never overwritten


def test_a_sweep_job_that_uses_nothing_of_its_sources_finds_the_finished_twin_that_computed_it(tmp_path):
    import json

    from omegaconf import OmegaConf

    from simfreeze.config import computation_digest, settings_digest
    from simfreeze.runs.resume import earlier_attempt
    from tests.helpers import compose_config

    def config(*overrides):
        return OmegaConf.to_container(compose_config(["model=small_cnn", *overrides]), resolve=True)

    scratch, other_source = config("+source.task.positive=deer"), config("+source.task.positive=frog")
    assert settings_digest(scratch) != settings_digest(other_source)  # other jobs of the sweep…
    assert computation_digest(scratch) == computation_digest(other_source)  # …the same computation
    twin, job = tmp_path / "0", tmp_path / "1"
    for path in (twin, job):
        (path / ".hydra").mkdir(parents=True)
    (twin / "results.json").write_text(json.dumps({"status": "ok", "computation_digest": computation_digest(scratch)}))
    assert earlier_attempt(job, other_source) == ("twin", twin)
    # a run that takes its weights or S from the source has no twin under another source
    for uses in (["arm=source", "+source.task.positive=frog"], ["arm=dynamic", "+source.task.positive=frog"]):
        assert earlier_attempt(job, config(*uses)) == ("new", None)
    (twin / "results.json").write_text(json.dumps({"status": "failed", "computation_digest": computation_digest(scratch)}))
    assert earlier_attempt(job, other_source) == ("new", None)  # only a finished one
