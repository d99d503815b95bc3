"""The programs a run can be: a fit (build → fit → test → results), and the source arm (train or
reuse the source task, report it). ``python -m train`` chooses one; the benchmark calls ``fit``."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from simfreeze.config import settings_digest
from simfreeze.errors import ConfigError, RunWithoutResult, TrainingDiverged, UserError
from simfreeze.networks.build import count_parameters
from simfreeze.runs.build import Run, build_run, prepare_sources, resolve
from simfreeze.runs.loggers import log_hparams
from simfreeze.runs.module import finite_state
from simfreeze.runs.results import finish, git_revision, metric, run_name, run_results, source_record
from simfreeze.runs.sources import source_chain, source_key, source_weights
from simfreeze.speed.precision import with_resolved_precision


def fit(cfg: dict, run_dir: Path, overrides: list[str] = (), callbacks: list = (), extra: dict | None = None,
        show: bool = True) -> dict[str, Any]:
    """Train one run into ``run_dir``; write ``results.json`` and print its line (``show``). Returns the
    results. ``callbacks``: more for the trainer (``simfreeze.runs.rate_search`` stops a rung with one);
    ``extra``: more keys for ``results.json``."""
    plan = resolve(cfg, run_dir)  # every check first: a bad setting fails before any source is trained
    run = build_run(plan, prepare_sources(plan, train_source=fit), callbacks=callbacks)
    cfg = plan.cfg
    trainer = run.trainer
    # weights_only: a checkpoint (ours hold tensors and primitives only) can never run code.
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg["ckpt_path"], weights_only=True)
    except Exception as err:
        refusal = lightning_refusal(err, cfg["trainer"])
        if refusal is None:
            raise
        raise refusal from err
    check_fit_result(run)  # before anything reports the run ok
    final = trainer.callback_metrics.get("val/acc")  # read before testing replaces the metrics
    test_acc = None
    if cfg["test"] and "test" in run.datamodule.tensors:
        # The path itself, not "best": with two checkpoint callbacks Lightning warns at every run that it picks the first.
        ckpt = run.best.best_model_path or None
        test_acc = trainer.test(run.module, datamodule=run.datamodule, ckpt_path=ckpt, verbose=False,
                                weights_only=True)[0]["test/acc"]
        if trainer.is_global_zero and trainer.world_size == 1:  # with DDP each process holds only its share
            write_test_predictions(run_dir / "test_predictions.json", run)
    trainable, total = count_parameters(run.module.net)
    results = run_results(
        cfg, run_dir, trainer,
        {"best_val_acc": metric(run.best.best_model_score), "final_val_acc": metric(final), "test_acc": metric(test_acc)},
        run.clock.summary(), {"images": run.datamodule.total_sizes, "test_from": run.datamodule.test_from,
                                       "classes": run.datamodule.num_classes}, run.transfer.record(),
        {"trainable_parameters": trainable, "total_parameters": total, "weights": run.network},
        {"precision_phases": precision_phases(run)}, source_record(run.source), chain_keys(plan.chain), extra or {},
        overrides=overrides, policy=plan.spec.policy)
    record_hparams(run, cfg, results)
    finished = finish(run_dir, results, write=trainer.is_global_zero, show=show)
    if not cfg["checkpoint"].get("keep", True) and trainer.is_global_zero:  # results.json is written: all a study reads
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return finished


# What a run leaves that a twin's copy carries over (checkpoints and logs stay with the run that trained).
TWIN_FILES = ("split.json", "plan.json", "test_predictions.json")


def copy_twin(cfg: dict, run_dir: Path, twin: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The results of a job whose computation ``twin`` (a finished job of the same sweep) did already
    (``simfreeze.runs.resume.finished_twin``): its files and results, with this job's own settings,
    chain of sources and directory, and ``same_as`` naming the twin. Nothing is trained."""
    for name in TWIN_FILES:
        if (twin / name).is_file():
            shutil.copyfile(twin / name, run_dir / name)
    results = json.loads((twin / "results.json").read_text())
    results.update(run_dir=str(run_dir), overrides=list(overrides), settings_digest=settings_digest(cfg),
                   **chain_record(cfg), same_as=str(twin), git_revision=git_revision(), command=" ".join(sys.argv))
    return finish(run_dir, results)


def chain_record(cfg: dict) -> dict:
    """The cache keys of the run's chain of sources, nearest first, from its config: also for a run
    that trains none of them (scratch), so that a study can tell which base a control belongs to."""
    return chain_keys(source_chain(cfg))


def chain_keys(chain: list[dict]) -> dict:
    """``chain_record`` of a chain built already (``RunPlan.chain``)."""
    return {"source_chain": [{"name": run_name(stage), "key": source_key(stage)} for stage in chain]}


def write_test_predictions(path: Path, run: Run) -> None:
    """Every held-out image's label and the best checkpoint's prediction, in the test split's order
    (the same for every run of one data config): the reports pair two settings image by image, so a
    difference carries the test set's own sampling error (``simfreeze.reports.stats.paired_interval``)."""
    labels = run.datamodule.tensors["test"][1]
    predicted = torch.cat(run.module.test_predictions).cpu() if run.module.test_predictions else torch.empty(0)
    path.write_text(json.dumps({"test_from": run.datamodule.test_from, "labels": labels.tolist(),
                                "predicted": predicted.tolist()}) + "\n")


def lightning_refusal(err: BaseException, trainer_cfg: dict) -> ConfigError | None:
    """Lightning's refusal of a trainer setting that only the data decides (``limit_train_batches=0.01``
    of 10 batches is none; ``val_check_interval`` above the epoch's batches), as one line, or None.
    Its refusals are ``MisconfigurationException``s or ``ValueError``s that name the argument in backticks."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, UserError):
        return None  # ours: already one line
    text = " ".join(str(err).split())
    named = set(re.findall(r"`(\w+)`", text)) & set(trainer_cfg)
    if isinstance(err, MisconfigurationException) or (isinstance(err, ValueError) and named):
        return ConfigError(f"trainer{'.' + sorted(named)[0] if named else ''}: {text[:400]}")
    return None


def check_fit_result(run: Run) -> None:
    """A fit that trained no step, never validated, or ended with NaN or infinite weights or
    validation loss has no result: it fails (``RunWithoutResult``, ``TrainingDiverged``) rather than
    reporting ``ok``. The module checks the weights every epoch before its checkpoints are saved;
    this holds at the end whatever the trainer's cadence (a stop by max_steps mid-epoch, say)."""
    trainer, module = run.trainer, run.module
    if trainer.global_step == 0:
        raise RunWithoutResult("the run trained no step (a trainer limit below one batch? trainer.limit_train_batches, "
                               "trainer.max_steps): it has no result; the run is failed, not reported")
    if run.best.best_model_score is None and not module.validated and trainer.ckpt_path and \
            trainer.current_epoch >= (trainer.max_epochs or 0):  # a finished run's checkpoint, in another directory
        raise RunWithoutResult(f"ckpt_path: its run had trained all trainer.max_epochs={trainer.max_epochs} epochs "
                               f"already, so nothing was left to train; resume a stopped run, or start a new one "
                               f"without ckpt_path")
    if run.best.best_model_score is None and not module.validated:
        raise RunWithoutResult("the run never validated (trainer.limit_val_batches, trainer.check_val_every_n_epoch, "
                               "trainer.val_check_interval): no val/acc and no best.ckpt; the run is failed, "
                               "not reported")
    if not bool(finite_state(module.net)):
        raise TrainingDiverged(f"training diverged: the weights are NaN or infinite at the end of the fit (epoch "
                               f"{trainer.current_epoch}, step {trainer.global_step}; a learning rate too high? "
                               f"optimizer.lr); the run is failed, not reported")
    val_loss = trainer.callback_metrics.get("val/loss")
    if val_loss is not None and not bool(torch.isfinite(torch.as_tensor(val_loss)).all()):
        raise TrainingDiverged("training diverged: the last validation loss is NaN or infinite (a learning rate too "
                               "high? optimizer.lr); the run is failed, not reported")


def precision_phases(run: Run) -> dict:
    """The precision each phase of the fit ran in (None: the phase did not run)."""
    ran = str(run.trainer.precision)
    cache = run.transfer.cache_record or {}
    return {"similarity": ran if run.transfer.similarity else None, "cache_fill": ran if cache.get("used") else None,
            "training": ran, "fp32_convs": run.fp32_convs}


def record_hparams(run: Run, cfg: dict, results: dict) -> None:
    """The loggers' hparams with the final metrics (S is known only once the fit set up)."""
    if run.trainer.is_global_zero:
        # Integers as text: HParams shows a number with three decimals (L_freeze 39.000), text as it is.
        # No "run": HParams' Trial ID is the run's name already.
        hparams = {"arm": cfg["arm"], "policy": results["policy"], "S": results["S"], "L_freeze": str(results["l_freeze"]),
                   "seed": str(cfg["seed"]), "task": results["name"]}
        # Named into the groups of the curves (test/acc is Lightning's own from the test), not a group of single
        # points that TensorBoard's Time Series, sorting groups by name, would show before train/ and val/.
        metrics = {"val/acc_best": results["best_val_acc"], "train/fit_seconds": results["fit_seconds"]}
        log_hparams(run.loggers, hparams, metrics, columns=HPARAMS_COLUMNS)


# HParams' columns, the same in every run's experiment summary: a run without S (scratch) still has the
# column, and the metric columns are the three a user compares (TensorBoard shows only five by default).
HPARAMS_COLUMNS = {"hparams": {"arm": "", "policy": "", "S": 0.0, "L_freeze": "", "seed": "", "task": ""},
                   "metrics": ("val/acc_best", "test/acc", "train/fit_seconds")}


def report_source(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The source arm: train the source task (or reuse it from the cache) and report it as a run."""
    _, source = source_weights(with_resolved_precision(cfg), train=fit)
    results = {**source, "arm": "source", "run_dir": str(run_dir), "source_dir": source["run_dir"],
               "overrides": list(overrides)}
    # Trained just now, the stage has printed its line (same numbers, its cache directory) above.
    return finish(run_dir, results, show=source["cached"])
