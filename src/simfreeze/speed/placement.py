"""Where a sweep job runs: one GPU per job when jobs of a multirun run side by side.

Lightning's ``devices=auto`` takes every visible GPU (and DDP), which is wrong for a job that
shares the machine with other jobs. In a multirun, ``trainer.devices=auto`` therefore means one
GPU, claimed with a non-blocking file lock in a machine-wide directory (``gpu_lock_dir``: every
sweep, and every user, on the machine shares it) named after the *physical* GPU (``physical_gpus``:
its UUID, or its ``CUDA_VISIBLE_DEVICES`` entry, never the process-local index), so that jobs running
at the same time (joblib, submitit local, two sweeps, two users whose ``CUDA_VISIBLE_DEVICES``
overlap) get different GPUs; the lock is released when the job ends. A SLURM job sees only its own
allocation: it takes that allocation's first GPU without a lock (a lock on the shared file system
would be one file for every job of the sweep, serialising it, or fail where the file system has no
``flock``). Where locking fails for another reason than "held", the job takes GPU ``job number mod
GPUs`` with a warning instead of failing.

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
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from simfreeze.paths import safe_name

log = logging.getLogger("simfreeze")

LOCK_DIR_ENV = "SIMFREEZE_GPU_LOCK_DIR"


def in_slurm_job(environ=os.environ) -> bool:
    """Inside a SLURM allocation (a job step, or submitit's SLURM executor)."""
    return "SLURM_JOB_ID" in environ


def wants_one_gpu(devices, accelerator: str, multirun: bool, n_cuda: int) -> bool:
    """Whether a job should be pinned to a single GPU (it asked for none in particular)."""
    return multirun and str(devices) == "auto" and accelerator in ("auto", "gpu", "cuda") and n_cuda > 0


def visible_devices(environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` allows, as it names them (indices, ``GPU-…`` UUIDs, ``MIG-…``
    ids); None when it is unset (every GPU), [] when it is empty (none)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def keep_visible_devices(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Shell lines that give a submitit local job this process's ``CUDA_VISIBLE_DEVICES`` (verbatim,
    or unset): submitit sets it to ``0..gpus_per_node-1`` just before running them."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ["unset CUDA_VISIBLE_DEVICES"]
    return [f"export CUDA_VISIBLE_DEVICES={shlex.quote(value)}"]


def cuda_uuid(index: int) -> str | None:
    """The UUID of this process's GPU ``index``, or None where torch cannot tell."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001 - no CUDA, an old torch: fall back to the visible entry
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def physical_gpus(n_cuda: int, visible: Sequence[str] | None,
                  uuid_of: Callable[[int], str | None] = lambda index: None) -> list[str]:
    """The machine-wide name of each of this process's GPUs ``0..n_cuda-1``.

    A MIG id as given; else the GPU's UUID where known (one name whichever way a user's
    ``CUDA_VISIBLE_DEVICES`` spells it: index, partial UUID, another ``CUDA_DEVICE_ORDER``); else its
    ``CUDA_VISIBLE_DEVICES`` entry; else (unset) the index itself."""
    names = []
    for index in range(n_cuda):
        entry = visible[index] if visible is not None and index < len(visible) else None
        if entry is not None and entry.startswith("MIG-"):
            names.append(entry)  # a MIG slice: its GPU's UUID would be shared with the other slices
            continue
        names.append(uuid_of(index) or entry or str(index))
    return names


def gpu_lock_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The machine-wide GPU lock directory: ``$SIMFREEZE_GPU_LOCK_DIR``, else ``<temp dir>/simfreeze-gpu-locks``."""
    return Path(environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "simfreeze-gpu-locks")


def lock_file(lock_dir: Path, name: str) -> Path:
    return lock_dir / f"gpu-{safe_name(name, fallback='gpu')}.lock"  # a MIG id holds '/'



def open_lock(path: Path) -> int:
    """A read-only descriptor of ``path`` (flock needs no write access), created if missing: any user
    can lock a file another user created."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path.parent, 0o1777)  # shared by every user, like /tmp
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:  # another user created it meanwhile (fs.protected_regular refuses O_CREAT)
            return os.open(path, os.O_RDONLY)


@contextlib.contextmanager
def claim_gpu(lock_dir: Path, gpus: int | Sequence[str], first: int = 0, poll_seconds: float = 2.0) -> Iterator[int]:
    """Hold an exclusive lock on one of ``gpus`` (their machine-wide names, or a count: names
    ``0..n-1``), trying ``first`` (the job number) mod their number first; yields its index.

    When every GPU is held by another job, waits until one is free.
    """
    names = [str(i) for i in range(gpus)] if isinstance(gpus, int) else list(gpus)
    order = [(first + i) % len(names) for i in range(len(names))]
    while True:
        for index in order:
            try:
                handle = open_lock(lock_file(lock_dir, names[index]))
            except OSError as err:  # an unwritable lock directory
                log.warning("GPU lock in %s failed (%s): taking GPU %d without a lock", lock_dir, err, order[0])
                yield order[0]
                return
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another job
                os.close(handle)
                continue
            except OSError as err:  # no flock here (ENOSYS, ENOLCK: e.g. Lustre without -o flock)
                os.close(handle)
                log.warning("GPU lock in %s failed (%s): taking GPU %d without a lock", lock_dir, err, order[0])
                yield order[0]
                return
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                os.close(handle)
            return
        time.sleep(poll_seconds)


@contextlib.contextmanager
def job_devices(trainer: dict, job: int, multirun: bool):
    """Pin a sweep job that asked for ``devices=auto`` to one GPU of its own (edits ``trainer``, the
    run config's trainer section, for the duration); the locks are machine-wide (``gpu_lock_dir``)."""
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
    names = physical_gpus(n_cuda, visible_devices(), cuda_uuid)
    with claim_gpu(gpu_lock_dir(), names, first=job) as index:
        log.info("job %s runs on cuda:%d (%s)", job, index, names[index])
        trainer.update(devices=[index], accelerator="gpu")
        yield
