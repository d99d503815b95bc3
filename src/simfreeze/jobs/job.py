"""How a job of ``python -m train`` runs, around the run itself (``train.train``): a sweep job run again
(kept, resumed, or copied from a finished twin), the GPUs it holds, a DDP job's own process tree, and
what a failure or a stop leaves — one ``error:`` line and exit status 2 for a single run, a recorded
failure for a sweep job, which must not stop the sweep."""

from __future__ import annotations

import errno
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from simfreeze.config import validate_config
from simfreeze.errors import ConfigError, RunDirInUse, RunError, UserError
from simfreeze.reports.sweep import main as summarise_sweep
from simfreeze.runs.fit import copy_twin
from simfreeze.runs.loggers import logs_for_job
from simfreeze.runs.preflight import discard_refused_run
from simfreeze.runs.progress import quiet_lightning
from simfreeze.runs.results import failed_results, write_results
from simfreeze.runs.resume import earlier_attempt
from simfreeze.speed.distributed import (process_rank, relaunches_command, run_in_own_process_tree, several_processes,
                                         sweep_job)
from simfreeze.speed.placement import job_devices

log = logging.getLogger("simfreeze")

Train = Callable[[dict, Path, list], dict]  # one run of a resolved config into a directory → its results


def run_job(cfg: DictConfig, train: Train) -> float | None:
    """One job of ``python -m train`` (a run, or a job of a sweep) under Hydra: ``train`` does the run;
    returns the best val accuracy, the objective for Hydra's sweepers."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else 0
    tree = sweep_job()  # a sweep job's DDP run in its own process tree: a sweep job all the same
    if tree:
        job_num, overrides = tree["num"], tree["overrides"]
    multirun = hydra_cfg.mode == RunMode.MULTIRUN or tree is not None
    try:
        validate_config(cfg)
        quiet_lightning(cfg.verbose)
        run_cfg = OmegaConf.to_container(cfg, resolve=True)
        run_cfg["logs"] = (tree or {}).get("logs") or logs_for_job(run_cfg, run_dir, overrides, multirun and not tree)
        relaunch = multirun and not tree and relaunches_command(run_cfg["trainer"])
        attempt, results = earlier_attempt(run_dir, run_cfg, not relaunch) if multirun and not tree else ("new", None)
        if attempt == "done":  # a sweep run again with its command: this job finished the last time
            log.info("job %s finished in an earlier run of this sweep: its results are kept", job_num)
            return results.get("best_val_acc")
        if attempt == "twin":  # e.g. the scratch control under a second base: it uses no source, so nothing differs
            log.info("job %s computes what job %s did (it uses nothing of its sources): its results are copied",
                     job_num, results.name)
            return copy_twin(run_cfg, run_dir, results, overrides).get("best_val_acc")
        if attempt == "resume":
            run_cfg["ckpt_path"] = str(run_dir / "checkpoints" / "last.ckpt")
            log.info("job %s: resuming from %s, where the sweep stopped the last time", job_num, run_cfg["ckpt_path"])
        with job_devices(run_cfg["trainer"], job_num, multirun):
            if relaunch:
                results = train_in_own_process_tree(run_dir, job_num, overrides, run_cfg)
            else:
                results = train(run_cfg, run_dir, overrides)
    except SIGTERMException:  # a scheduler's stop, which Lightning raises as SystemExit(None), i.e. status 0
        if multirun and not tree and process_rank() == 0:
            summarise_stopped_sweep(Path(hydra_cfg.sweep.dir), run_dir, cfg, overrides)
        sys.exit(128 + signal.SIGTERM)  # the fit wrote last.ckpt and logged how to resume
    except Exception as err:
        if not multirun:
            message = str(err) if isinstance(err, UserError) else disk_full_line(err)
            if message:
                # One clear line instead of a traceback: the message names the key and what is allowed.
                log.error("%s", message, extra={"console": False})  # train.log says why the run stopped
                if not isinstance(err, RunError):  # a RunError's directory: another run's, or a log worth reading
                    discard_refused_run(run_dir, cfg.get("ckpt_path"))
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)
            raise
        # One failed job must not stop the sweep: record it where the summary finds it, go on.
        # The traceback for train.log; the console has the error line below.
        log.error("job %s failed", job_num, exc_info=not isinstance(err, UserError), extra={"console": False})
        print(f"error: job {job_num} ({' '.join(overrides)}): {err}", file=sys.stderr)
        if isinstance(err, RunDirInUse):
            return None  # that directory's results.json belongs to the other run
        if process_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_results(run_dir / "results.json", failed_results(OmegaConf.to_container(cfg), run_dir, err, overrides))
        if several_processes():
            raise  # the launcher then ends the job's other processes, which would wait for this one
        return None
    return results.get("best_val_acc")  # the objective for Hydra sweepers




def disk_full_line(err: BaseException) -> str | None:
    """One line for a write that found the disk full (or over quota), else None."""
    while err is not None and not (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    where = f" writing {err.filename}" if err.filename else ""
    return (f"no space left on the device{where}: free space, or give hydra.run.dir (and source.cache_dir) "
            f"on another disk")


def summarise_stopped_sweep(sweep_dir: Path, run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """A sweep stopped by SIGTERM (a scheduler's stop) in one of its jobs: that job recorded as
    ``stopped``, and the sweep's summary written for the jobs that finished (the rest are listed)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    why = f"stopped by SIGTERM; the sweep's command run again {'resumes it from ' + str(last) if last.is_file() else 'runs it again'}"
    record = failed_results(OmegaConf.to_container(cfg), run_dir, RuntimeError(why), overrides)
    write_results(run_dir / "results.json", {**record, "status": "stopped", "error": why})
    log.warning("sweep stopped by SIGTERM in job %s: summarising the jobs that finished", run_dir.name)
    summarise_sweep([str(sweep_dir)])


def train_in_own_process_tree(run_dir: Path, job_num: int, overrides: list[str], cfg: dict) -> dict[str, Any]:
    """A sweep job whose trainer would relaunch the command for DDP, run in a process tree of its
    own (``simfreeze.speed.distributed``) on the devices this job holds (``cfg["trainer"]``), logging
    where this job logs; returns what its ``results.json`` holds."""
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"DDP in a sweep job runs the job's saved config ({run_dir / '.hydra'}), which "
                          f"hydra.output_subdir=null left unsaved; keep the default hydra.output_subdir")
    log.info("job %s: DDP in a process tree of its own", job_num)
    done = run_in_own_process_tree(run_dir, job_num, overrides, cfg["trainer"], cfg["logs"])
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else None
    if results is None:
        raise RuntimeError(f"the job's DDP processes exited with status {done.returncode} without results "
                           f"(see {run_dir / 'train.log'})")
    return results
