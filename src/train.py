"""`python -m train [overrides]`: validate → run (the similarity analysis, the source arm, or a fit:
build → fit → test) → results.json.

Examples::

    python -m train                                   # cat vs dog from scratch, ResNet-50, 3 epochs
    python -m train +experiment=cat_to_dog            # the paper's protocol: every arm, one summary
    python -m train arm=dynamic data.positive=dog +source.task.positive=cat
    python -m train --cfg job                         # print the composed config

The pieces live in ``simfreeze`` (docs/architecture.md, "How the code is laid out").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from simfreeze.config import register_resolvers, validate_config
from simfreeze.errors import ConfigError, DiskFull, RunDirInUse, TrainingDiverged

log = logging.getLogger("simfreeze")
register_resolvers()  # before Hydra composes; submitit's job processes import this module too


def train(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """One run of a resolved config into ``run_dir``; returns what its ``results.json`` holds."""
    from simfreeze import analysis
    from simfreeze.runs.fit import fit, report_source
    from simfreeze.runs.rate_search import search_rates

    if cfg["similarity"]["analysis"]:  # no training: embed every class, write the paper's figures
        return analysis.run(cfg, run_dir, overrides, train_source=fit)
    if cfg["source_only"]:  # the source arm: train (or reuse) the source task and report it
        return report_source(cfg, run_dir, overrides)
    if (cfg.get("lr_search") or {}).get("rates"):  # every rate to its first validation, the best one on to the end
        return search_rates(cfg, run_dir, overrides, fit)
    return fit(cfg, run_dir, overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from simfreeze.runs.loggers import logs_for_job
    from simfreeze.runs.progress import quiet_lightning
    from simfreeze.runs.resume import earlier_attempt
    from simfreeze.speed.distributed import process_rank, relaunches_command, several_processes, sweep_job
    from simfreeze.speed.placement import job_devices

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
            from simfreeze.runs.fit import copy_twin

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
            message = str(err) if isinstance(err, ConfigError) else disk_full_line(err)
            if message:
                # One clear line instead of a traceback: the message names the key and what is allowed.
                from simfreeze.runs.preflight import discard_refused_run

                log.error("%s", message, extra={"console": False})  # train.log says why the run stopped
                if not isinstance(err, (RunDirInUse, TrainingDiverged, DiskFull)):  # another run's; a log worth reading
                    discard_refused_run(run_dir, cfg.get("ckpt_path"))
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)
            raise
        # One failed job must not stop the sweep: record it where the summary finds it, go on.
        from simfreeze.runs.results import failed_results, write_results

        # The traceback for train.log; the console has the error line below.
        log.error("job %s failed", job_num, exc_info=not isinstance(err, ConfigError), extra={"console": False})
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
    import errno

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
    from simfreeze.reports.sweep import main as summarise_sweep
    from simfreeze.runs.results import failed_results, write_results

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
    import json

    from simfreeze.speed.distributed import run_in_own_process_tree

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
        if "job" in sys.argv[1:] and {"--cfg", "-c"} & set(sys.argv[1:]):
            note = sweep_note(sys.argv[1:])
            if note:
                print(note)
    except CompactHydraException as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except yaml.YAMLError as err:  # a config file that is not valid YAML (conf/, an experiment, --config-dir)
        print(f"error: {yaml_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


def yaml_error_line(err: Exception) -> str:
    """``conf/experiment/x.yaml, line 3, column 6: while parsing a flow sequence: expected ',' or ']'``."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = ": ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return f"{where}{what or ' '.join(str(err).split())} (not valid YAML)"


def sweep_note(argv: list[str]) -> str | None:
    """After ``--cfg job`` of an experiment that sweeps (``hydra.sweeper.params``): what each of its
    jobs sets, which the printed config (one composition, before the sweep) cannot show."""
    from hydra import compose, initialize_config_dir

    takes_value = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}
    overrides = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in takes_value)]
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        params = compose("train", overrides, return_hydra_config=True).hydra.sweeper.params or {}
    if not params:
        return None
    lines = [f"#   {key}: {value}" for key, value in params.items()]
    return "\n".join(["# This is a sweep: the config above is before its values; its jobs take every combination of", *lines])


if __name__ == "__main__":
    cli()
