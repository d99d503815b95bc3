"""`python -m train [overrides]`: validate → run (the similarity analysis, the source arm, or a fit:
build → fit → test) → results.json.

Examples::

    python -m train                                   # cat vs dog from scratch, ResNet-50, 3 epochs
    python -m train +experiment=cat_to_dog            # the paper's protocol: every arm, one summary
    python -m train arm=dynamic data.positive=dog +source.task.positive=cat
    python -m train --cfg job                         # print the composed config

The pieces live in ``simfreeze`` (README, "How the code is laid out").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from simfreeze.config import register_resolvers, validate_config
from simfreeze.errors import ConfigError, RunDirInUse, TrainingDiverged

log = logging.getLogger("simfreeze")
register_resolvers()  # before Hydra composes; submitit's job processes import this module too


def train(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """One run of a resolved config into ``run_dir``; returns what its ``results.json`` holds."""
    from simfreeze import analysis
    from simfreeze.runs.fit import fit, report_source

    if cfg["similarity"]["analysis"]:  # no training: embed every class, write the paper's figures
        return analysis.run(cfg, run_dir, overrides, train_source=fit)
    if cfg["source_only"]:  # the source arm: train (or reuse) the source task and report it
        return report_source(cfg, run_dir, overrides)
    return fit(cfg, run_dir, overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from simfreeze.runs.progress import quiet_lightning
    from simfreeze.speed.placement import job_devices

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate_config(cfg)
        quiet_lightning()
        run_cfg = OmegaConf.to_container(cfg, resolve=True)
        sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else run_dir
        with job_devices(run_cfg["trainer"], sweep_dir, hydra_cfg.job.num if multirun else 0, multirun):
            results = train(run_cfg, run_dir, overrides)
    except SIGTERMException:  # a scheduler's stop, which Lightning raises as SystemExit(None), i.e. status 0
        sys.exit(128 + signal.SIGTERM)  # the fit wrote last.ckpt and logged how to resume
    except Exception as err:
        if not multirun:
            if isinstance(err, ConfigError):
                # One clear line instead of a traceback: the message names the key and what is allowed.
                from simfreeze.runs.preflight import discard_refused_run

                if not isinstance(err, (RunDirInUse, TrainingDiverged)):  # another run's; a log worth reading
                    discard_refused_run(run_dir, cfg.get("ckpt_path"))
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise
        # One failed job must not stop the sweep: record it where the summary finds it, go on.
        from simfreeze.runs.results import failed_results, write_results

        log.error("job %s failed", hydra_cfg.job.num, exc_info=not isinstance(err, ConfigError))
        print(f"error: job {hydra_cfg.job.num} ({' '.join(overrides)}): {err}", file=sys.stderr)
        if isinstance(err, RunDirInUse):
            return None  # that directory's results.json belongs to the other run
        run_dir.mkdir(parents=True, exist_ok=True)
        write_results(run_dir / "results.json", failed_results(OmegaConf.to_container(cfg), run_dir, err, overrides))
        return None
    return results.get("best_val_acc")  # the objective for Hydra sweepers


def cli() -> None:
    """``python -m train``: Hydra's composition errors (an unknown group option or key, override
    syntax) end like ours, with one ``error:`` line and exit status 2, instead of Hydra's report."""
    from hydra.errors import CompactHydraException

    from simfreeze.runs.preflight import hydra_error_line

    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full report
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach this function
    try:
        main()
    except CompactHydraException as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
