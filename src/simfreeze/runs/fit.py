"""The programs a run can be: a fit (build → fit → test → results), and the source arm (train or
reuse the source task, report it). ``python -m train`` chooses one; the benchmark calls ``fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simfreeze.networks.build import count_parameters
from simfreeze.runs.build import Run, build_run
from simfreeze.runs.loggers import log_hparams
from simfreeze.runs.results import finish, metric, run_results, source_record
from simfreeze.runs.sources import source_weights
from simfreeze.speed.precision import with_resolved_precision


def fit(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Train one run into ``run_dir``; write ``results.json`` and print its line. Returns the results."""
    cfg = with_resolved_precision(cfg)
    run = build_run(cfg, run_dir, train_source=fit)
    trainer = run.trainer
    # weights_only: a checkpoint (ours hold tensors and primitives only) can never run code.
    trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg["ckpt_path"], weights_only=True)
    final = trainer.callback_metrics.get("val/acc")  # read before testing replaces the metrics
    test_acc = None
    if cfg["test"] and "test" in run.datamodule.tensors:
        ckpt = "best" if run.best.best_model_path else None
        test_acc = trainer.test(run.module, datamodule=run.datamodule, ckpt_path=ckpt, verbose=False,
                                weights_only=True)[0]["test/acc"]
    trainable, total = count_parameters(run.module.net)
    results = run_results(
        cfg, run_dir, trainer,
        {"best_val_acc": metric(run.best.best_model_score), "final_val_acc": metric(final), "test_acc": metric(test_acc)},
        run.clock.summary(), {"images": run.datamodule.total_sizes}, run.transfer.record(),
        {"trainable_parameters": trainable, "total_parameters": total, "weights": run.network},
        {"precision_phases": precision_phases(run)}, source_record(run.source), overrides=overrides)
    record_hparams(run, cfg, results)
    return finish(run_dir, results, write=trainer.is_global_zero)


def precision_phases(run: Run) -> dict:
    """The precision each phase of the fit ran in (None: the phase did not run)."""
    ran = str(run.trainer.precision)
    cache = run.transfer.cache_record or {}
    return {"similarity": ran if run.transfer.similarity else None, "cache_fill": ran if cache.get("used") else None,
            "training": ran, "fp32_convs": run.fp32_convs}


def record_hparams(run: Run, cfg: dict, results: dict) -> None:
    """The loggers' hparams with the final metrics (S is known only once the fit set up)."""
    if run.trainer.is_global_zero:
        hparams = {"arm": cfg["arm"], "policy": results["policy"], "S": results["S"], "L_freeze": results["l_freeze"],
                   "seed": str(cfg["seed"]), "task": results["name"], "run": (cfg.get("logs") or {}).get("name")}
        metrics = {"hp/best_val_acc": results["best_val_acc"], "hp/test_acc": results["test_acc"],
                   "hp/fit_seconds": results["fit_seconds"]}
        log_hparams(run.loggers, hparams, metrics)


def report_source(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The source arm: train the source task (or reuse it from the cache) and report it as a run."""
    _, source = source_weights(with_resolved_precision(cfg), train=fit)
    results = {**source, "arm": "source", "run_dir": str(run_dir), "source_dir": source["run_dir"],
               "overrides": list(overrides)}
    # Trained just now, the stage has printed its line (same numbers, its cache directory) above.
    return finish(run_dir, results, show=source["cached"])
