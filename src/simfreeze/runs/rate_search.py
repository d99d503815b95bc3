"""A learning rate chosen inside one job (``lr_search.rates``): successive halving with one rung.

Every rate trains the job's full schedule until its first validation at or after ``lr_search.rung``
steps and stops there; the rate with the best validation accuracy by then trains the whole run again
from the start, in the job's own directory, and is tested. The job's result is therefore the very run
a sweep over ``optimizer.lr`` makes at the chosen rate (bit for bit on a CPU); what differs is the
choice, made on validation at the rung instead of at the end. Three rates and a rung at a third of
the steps cost 3 × 1/3 + 1 = 2 runs' training instead of 3, and one test instead of three. (Resuming
the winner from its rung would save another third of a run, but a ``max_steps`` run resumed from an
epoch's end goes on in a short extra epoch — tried with Lightning 2.6; Lightning #19403 reports the like —
so it sees other batches and the result would no longer be the sweep's.)

Each rate's rung runs in ``<job>/rates/lr=<rate>/`` (TensorBoard: ``<job's name>/lr=<rate>``) and
keeps its ``results.json``; a job run again keeps the rungs that finished. The job's ``results.json``
adds ``lr_search``: the rates, each rung's step, validation accuracy and fit seconds, the choice, and
the rungs' seconds (the search's time is those and the job's ``fit_seconds``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L

from simfreeze.config import settings_digest
from simfreeze.errors import RunWithoutResult, TrainingDiverged
from simfreeze.runs.resume import earlier_attempt
from simfreeze.runs.sources import apply_recipe

OFF = {"rates": None, "rung": None}


class StopAtRung(L.Callback):
    """Stops the fit after its first validation at or after ``step`` steps (not the sanity check);
    the schedule is the full run's, so the rung sees what the full run sees by then."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.global_step >= self.step:
            trainer.should_stop = True


def rate_dir(run_dir: Path, rate: float) -> Path:
    return run_dir / "rates" / f"lr={rate:g}"


def with_rate(cfg: dict, rate: float) -> dict:
    """``cfg`` at learning rate ``rate``, with the one-cycle peak when it follows ``optimizer.lr`` (as
    composing ``optimizer.lr=<rate>`` would give; a source's recipe rate is applied the same way), and
    no search of its own."""
    scheduler = cfg.get("scheduler")
    out = {**cfg, "scheduler": dict(scheduler) if scheduler else scheduler, "lr_search": OFF}
    apply_recipe(out, {"optimizer": {"lr": rate}})
    return out


def rung_config(cfg: dict, rate: float, run_dir: Path) -> dict:
    """One rate's rung: its own TensorBoard name, no test, no checkpoints kept."""
    logs = cfg.get("logs") or {}
    name = logs.get("name") or f"arm={cfg['arm']}/seed={cfg['seed']}"
    return {**with_rate(cfg, rate), "ckpt_path": None, "test": False, "checkpoint": {**cfg["checkpoint"], "keep": False},
            "logs": {"dir": logs.get("dir") or str(run_dir), "name": f"{name}/lr={rate:g}"}}


def run_rung(fit: Callable, cfg: dict, rate: float, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One rate trained to the rung, or its rung from an earlier run of the job: the rate, the step it
    stopped at, its best validation accuracy and fit seconds (None and the error when it diverged)."""
    where = rate_dir(run_dir, rate)
    rung = rung_config(cfg, rate, run_dir)
    state, results = earlier_attempt(where, rung, can_resume=False, twins=False)  # a rung stopped halfway starts again
    try:
        if state != "done":
            results = fit(rung, where, overrides, callbacks=[StopAtRung(cfg["lr_search"]["rung"] or 1)])
    except (TrainingDiverged, RunWithoutResult) as err:  # a rate too high is an answer of the search, not its end
        return {"lr": rate, "step": None, "val_acc": None, "fit_seconds": None, "error": str(err)}
    return {"lr": rate, "step": results["steps"], "val_acc": results["best_val_acc"], "fit_seconds": results["fit_seconds"]}


def choose(rungs: list[dict]) -> dict:
    """The rung with the best validation accuracy; a tie goes to the rate listed first."""
    trained = [rung for rung in rungs if rung["val_acc"] is not None]
    if not trained:
        raise TrainingDiverged("lr_search: no rate of lr_search.rates trained to the rung (" +
                               "; ".join(f"lr={rung['lr']:g}: {rung.get('error')}" for rung in rungs) + ")")
    return max(trained, key=lambda rung: rung["val_acc"])


def search_rates(cfg: dict, run_dir: Path, overrides: list[str], fit: Callable) -> dict[str, Any]:
    """The job of ``cfg`` with its learning rate chosen among ``lr_search.rates`` (module docstring)."""
    rates = list(cfg["lr_search"]["rates"])
    rungs = [run_rung(fit, cfg, rate, run_dir, overrides) for rate in rates]
    best = choose(rungs)
    searched = sum(rung["fit_seconds"] or 0.0 for rung in rungs)
    record = {"rates": rates, "rung": cfg["lr_search"]["rung"], "chosen": best["lr"], "rungs": rungs,
              "rung_seconds": round(searched, 3)}
    # The job's digest, not the winner's: a sweep run again finds the job done.
    results = fit(with_rate(cfg, best["lr"]), run_dir, overrides,
                  extra={"lr_search": record, "settings_digest": settings_digest(cfg)})
    return results
