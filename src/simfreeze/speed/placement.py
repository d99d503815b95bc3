"""Where a sweep job runs: one GPU per job when jobs of a multirun run side by side.

Lightning's ``devices=auto`` takes every visible GPU (and DDP), which is wrong for a job that
shares the machine with other jobs of its sweep. In a multirun, ``trainer.devices=auto`` therefore
means one GPU, claimed with a non-blocking file lock under the sweep directory so that jobs
running at the same time (joblib, submitit local) get different GPUs; the lock is released when the
job ends. A SLURM job sees only its own allocation: it takes that allocation's first GPU without a
lock (a lock on the shared file system would be one file for every job of the sweep, serialising it,
or fail where the file system has no ``flock``). Where locking fails for another reason than "held",
the job takes GPU ``job number mod GPUs`` with a warning instead of failing.

submitit's local executor sets a job's ``CUDA_VISIBLE_DEVICES`` to ``0..gpus_per_node-1`` (and takes
integer indices only), which is not the user's restriction; ``keep_visible_devices`` gives the shell
lines (its ``setup``, conf/hydra/launcher/local_queue.yaml) that hand the job the parent's value.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Iterator, Mapping

log = logging.getLogger("simfreeze")


def in_slurm_job(environ=os.environ) -> bool:
    """Inside a SLURM allocation (a job step, or submitit's SLURM executor)."""
    return "SLURM_JOB_ID" in environ


def wants_one_gpu(devices, accelerator: str, multirun: bool, n_cuda: int) -> bool:
    """Whether a job should be pinned to a single GPU (it asked for none in particular)."""
    return multirun and str(devices) == "auto" and accelerator in ("auto", "gpu", "cuda") and n_cuda > 0


def keep_visible_devices(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Shell lines that give a submitit local job this process's ``CUDA_VISIBLE_DEVICES`` (verbatim,
    or unset): submitit sets it to ``0..gpus_per_node-1`` just before running them."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ["unset CUDA_VISIBLE_DEVICES"]
    return [f"export CUDA_VISIBLE_DEVICES={shlex.quote(value)}"]


@contextlib.contextmanager
def claim_gpu(lock_dir: Path, n_gpus: int, first: int = 0, poll_seconds: float = 2.0) -> Iterator[int]:
    """Hold an exclusive lock on one of ``n_gpus`` GPUs, trying ``first`` (the job number) first.

    When every GPU is held by another job, waits until one is free.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    order = [(first + i) % n_gpus for i in range(n_gpus)]
    while True:
        for index in order:
            handle = open(lock_dir / f"gpu{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another job
                handle.close()
                continue
            except OSError as err:  # no flock here (ENOSYS, ENOLCK: e.g. Lustre without -o flock)
                handle.close()
                log.warning("GPU lock %s failed (%s): taking GPU %d without a lock", lock_dir, err, order[0])
                yield order[0]
                return
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_seconds)


@contextlib.contextmanager
def job_devices(trainer: dict, sweep_dir: Path, job: int, multirun: bool):
    """Pin a sweep job that asked for ``devices=auto`` to one GPU of its own (edits ``trainer``, the
    run config's trainer section, for the duration)."""
    import torch

    n_cuda = torch.cuda.device_count()
    if not wants_one_gpu(trainer["devices"], trainer["accelerator"], multirun, n_cuda):
        yield
        return
    if in_slurm_job():
        log.info("job %s runs on its SLURM allocation's first GPU", job)
        trainer.update(devices=[0], accelerator="gpu")
        yield
        return
    with claim_gpu(sweep_dir / ".gpu-locks", n_cuda, first=job) as index:
        log.info("job %s runs on cuda:%d", job, index)
        trainer.update(devices=[index], accelerator="gpu")
        yield
