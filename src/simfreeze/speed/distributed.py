"""DDP: rows of unequal length gathered across processes, and DDP inside a sweep.

With DDP each process holds its own share of the images (``TaskDataModule.set_shard``); what is
measured over all of them (the class centroids of S, LogME's features) is gathered here.

Inside a multirun, Lightning's DDP would start its processes by running the command line again
(``sys.argv``), which is the whole sweep. A sweep job whose trainer would do that runs instead in a
process tree of its own: ``python -m train`` on the job's saved config, a single run whose
processes Lightning may relaunch safely. A job whose processes the cluster starts (SLURM tasks,
torchrun) needs none of this. When one process of a job with several fails, it exits with an
error, so that the launcher ends the others (``SLURM_KILL_BAD_EXIT`` in conf/hydra/launcher/slurm.yaml)
instead of leaving them waiting in a collective until its timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

# Set in a sweep job's own process tree: {"num": job number, "overrides": the job's overrides}.
SWEEP_JOB_ENV = "SIMFREEZE_SWEEP_JOB"


def gather_rows(rows: torch.Tensor, strategy) -> torch.Tensor:
    """Every process's ``rows`` (N_i, ...) concatenated in rank order, on the CPU; the N_i may
    differ (Lightning's ``all_gather`` needs one shape, so each share is padded to the longest)."""
    if strategy.world_size == 1:
        return rows
    device = strategy.root_device  # NCCL gathers CUDA tensors only
    with warnings.catch_warnings():  # Lightning's gather goes through a function torch now calls deprecated
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated")
        counts = strategy.all_gather(torch.tensor([len(rows)], device=device)).flatten().tolist()
        padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
        padded[:len(rows)] = rows.to(device)
        gathered = strategy.all_gather(padded)  # (world, longest, ...)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)]).cpu()


def relaunches_command(trainer: dict) -> bool:
    """Whether Lightning would start this trainer config's processes by running ``sys.argv`` again
    (DDP not started by SLURM or torchrun)."""
    import lightning as L
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    import logging

    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero_log.level
    rank_zero_log.setLevel(logging.WARNING)  # the probe's "GPU available" lines would repeat the run's
    try:  # precision plays no part in the choice of launcher ("auto" is ours, not Lightning's)
        probe = L.Trainer(**{k: v for k, v in trainer.items() if k != "precision"}, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    finally:
        rank_zero_log.setLevel(level)
    # SLURM and torchrun start the processes themselves: the launcher then only joins them. With one
    # device there is nothing to relaunch, but the process group and the environment variables it
    # leaves would make the sweep's next job take itself for a process of a started job.
    return (isinstance(probe.strategy.launcher, _SubprocessScriptLauncher)
            and not probe.strategy.cluster_environment.creates_processes_externally)


def several_processes(environ=os.environ) -> bool:
    """Whether this job runs as one of several processes (DDP started by Lightning, SLURM or torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(environ.get("WORLD_SIZE") or environ.get("SLURM_NTASKS") or 1) > 1


def process_rank(environ=os.environ) -> int:
    """This process's global rank (0 without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(environ.get("RANK") or environ.get("SLURM_PROCID") or 0)


def sweep_job(environ=os.environ) -> dict | None:
    """The sweep job this process runs for in its own process tree (None: not in one)."""
    value = environ.get(SWEEP_JOB_ENV)
    return json.loads(value) if value else None


def own_process_tree_command(run_dir: Path, trainer: dict) -> list[str]:
    """``python -m train`` on the job's saved config (``.hydra/config.yaml``), as a single run in
    the job's directory that leaves the saved config as it is, on the devices the job holds (a GPU
    this job claimed, which the new process must not try to claim again)."""
    return [sys.executable, "-m", "train", "--config-path", str((run_dir / ".hydra").resolve()), "--config-name",
            "config", f"hydra.run.dir={run_dir.resolve()}", "hydra.output_subdir=null",
            f"trainer.devices={json.dumps(trainer['devices'])}", f"trainer.accelerator={trainer['accelerator']}"]


def run_in_own_process_tree(run_dir: Path, job: int, overrides: list[str], trainer: dict, logs: dict
                            ) -> subprocess.CompletedProcess:
    """Run a sweep job in a process tree of its own (see the module's docstring); its output goes
    to this process's console, and it writes the job's ``results.json``; its loggers write where
    the job's would (``logs``)."""
    env = {**os.environ, SWEEP_JOB_ENV: json.dumps({"num": job, "overrides": list(overrides), "logs": logs})}
    return subprocess.run(own_process_tree_command(run_dir, trainer), env=env, check=False)
