"""Resume: ``last.ckpt`` and what it must hold. ``LastCheckpoint`` writes it every N epochs, at the
end of training and when a run is stopped; the random number generators' states travel with every
checkpoint, and a resume must continue the same run (``SameRunOnResume``).

Lightning restores weights, optimizer, scheduler, loops and callbacks from ``ckpt_path``, but not
the RNGs that draw the batch order and the flips, so a resumed run would see other batches than the
uninterrupted one. This callback stores torch's (CPU and CUDA), Python's and NumPy's states in the
checkpoint and puts them back on restore: on CPU a resumed run ends bit for bit where the
uninterrupted run ends (tests/test_reproducibility.py).

A resume that is refused changes nothing: ``check_resume`` makes every check that can refuse it
(settings, the data's files, the frozen prefix) before the run touches its directory, and every
checkpoint is written under a temporary name and renamed into place (``AtomicCheckpointIO``), so a
failed write (a full disk) leaves the previous ``last.ckpt`` as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from simfreeze.config import computation_digest, resume_differences, run_settings, settings_digest, uses_source
from simfreeze.errors import ConfigError, DiskFull, RunDirInUse, UserError
from simfreeze.method.freeze import frozen_state_from
from simfreeze.networks.build import FROZEN_STATE
from simfreeze.reports.records import finished

log = logging.getLogger("simfreeze")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, everything a resume needs, written by Lightning's ``ModelCheckpoint`` every
    ``every_n_epochs`` epochs (0: none on the way) and when the fit is stopped by an exception
    (``save_on_exception``): SIGTERM, which Lightning turns into one at the next batch, Ctrl-C, an
    error. What it lacks is added here: a save when training ends (the last epoch need not be a
    multiple of N); none for a ``UserError`` (a diverged run's weights are NaN, a refused restore
    has nothing of its own) or while testing (the module then holds the best weights); a stop in
    ``on_train_epoch_start`` saved as the end of the epoch before, which it is (Lightning 2.6 would
    resume the checkpoint it writes there past that epoch, untrained); and a line saying how to resume,
    or, in a source stage (``staged``), that the stage is trained again: its staging folder, this
    checkpoint with it, is discarded after a failure (``simfreeze.runs.sources.cached_source``)."""

    def __init__(self, dirpath: Path, every_n_epochs: int, staged: bool = False):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, every_n_epochs=every_n_epochs,
                         save_on_exception=True, enable_version_counter=False)
        self.staged = staged

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skipped when this step is saved already
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, UserError) or trainer.state.fn != TrainerFn.FITTING:
            return
        epochs = trainer.fit_loop.epoch_progress
        between = epochs.current.ready > epochs.current.started  # the next epoch made ready, not begun
        if between:
            epochs.total.ready, epochs.current.ready = epochs.total.ready - 1, epochs.current.ready - 1
        try:
            super().on_exception(trainer, pl_module, exception)  # unless this step is saved already
        finally:
            if between:
                epochs.total.ready, epochs.current.ready = epochs.total.ready + 1, epochs.current.ready + 1
        path = self.format_checkpoint_name({})
        where = f"stopped ({type(exception).__name__}) in epoch {trainer.current_epoch + 1} at step {trainer.global_step}"
        if trainer.is_global_zero and self.staged:
            log.warning("%s of a source stage: its staging folder is discarded, and the stage is trained again "
                        "when the run is started again", where)
        elif trainer.is_global_zero and Path(path).is_file():
            log.warning("%s: resume with ckpt_path=%s", where, path)


class RandomStateCallback(L.Callback):
    def state_dict(self) -> dict:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # NumPy's key is an array: stored as a list so the checkpoint loads with weights_only=True.
        name, key, *rest = states["numpy"]
        return {**states, "numpy": (name, key.tolist(), *rest)}

    def load_state_dict(self, state_dict: dict) -> None:
        name, key, *rest = state_dict["numpy"]
        _set_rng_states({**state_dict, "numpy": (name, np.array(key, dtype=np.uint32), *rest)})


class SameRunOnResume(L.Callback):
    """A resume continues the run its checkpoint came from: the checkpoint keeps the run's settings
    (``simfreeze.config.run_settings``) and the digest of its split's files (``files``:
    ``TaskDataModule.files_digest``), and a resume whose config differs in any of them (other
    classes, seed, learning rate, plan, …) or whose ``data.root`` holds other images is refused
    (``resume_refusal``) instead of continuing the old network under the new labels.
    ``validate_config`` checks the settings before any work and ``check_resume`` all of it before
    the run touches its directory; this one holds for runs started without them."""

    def __init__(self, cfg: dict, files: str | None = None):
        self.cfg, self.settings, self.files = cfg, run_settings(cfg), files

    def state_dict(self) -> dict:
        return {"settings": self.settings, "files": self.files}

    def load_state_dict(self, state_dict: dict) -> None:
        refusal = resume_refusal(state_dict, self.cfg, self.files)
        if refusal:
            raise ConfigError(refusal)


def resume_refusal(stored: Mapping[str, Any], cfg: dict, files: str | None) -> str | None:
    """Why a checkpoint whose ``SameRunOnResume`` state is ``stored`` is not this run's (``cfg``,
    its split's files' digest ``files``), or None. A checkpoint written before the digest existed,
    or data that is no folder of files, is not compared."""
    differences = resume_differences(stored.get("settings", {}), cfg)
    if differences:
        return differences
    if stored.get("files") and files and stored["files"] != files:
        return (f"ckpt_path: data.root='{cfg['data']['root']}' holds other images for this run's split than the "
                f"checkpoint's run trained on (the files of split.json or their contents differ); resume with the "
                f"data it was trained on, or start a new run without ckpt_path")
    return None


def same_run_state(checkpoint: Mapping[str, Any]) -> dict | None:
    """The ``SameRunOnResume`` state a checkpoint holds, or None."""
    return next((state for name, state in (checkpoint.get("callbacks") or {}).items()
                 if name.startswith("SameRunOnResume")), None)


def check_resume(checkpoint: Mapping[str, Any], cfg: dict, module_state: Mapping[str, torch.Tensor],
                 files: str | None, path: str) -> None:
    """Every check that can refuse resuming ``checkpoint`` (read from ``path``) as the run ``cfg``
    builds: its settings and files (``resume_refusal``) and its frozen prefix against the rebuilt
    network's (``module_state``). Made before the run touches its directory (loggers, split.json,
    checkpoints), so a refused resume changes nothing there; Lightning's restore checks again."""
    stored = same_run_state(checkpoint)
    refusal = resume_refusal(stored, cfg, files) if stored is not None else None
    if refusal:
        raise ConfigError(refusal)
    record = checkpoint.get(FROZEN_STATE)
    if record:
        frozen_state_from(record, module_state, f"the checkpoint '{path}'")


def checkpoint_step(checkpoint: Mapping[str, Any]) -> int:
    """The step a resume of ``checkpoint`` logs first: what the run logged from it on is logged again."""
    epoch_loop = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(epoch_loop.get("_batches_that_stepped", checkpoint.get("global_step", 0)))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to ``.<name>.tmp-<pid>`` beside their place and renamed into it: a write
    that fails (a full disk, a kill) leaves the previous file whole and no temporary behind.
    Lightning's own writes through a temporary file in the system's temp folder, which, on another
    file system, is copied into place: a full disk there left a truncated ``last.ckpt``. No fsync:
    this is about failed writes, not power loss. A full disk ends as ``DiskFull`` (one line)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
            os.replace(temporary, path)
        except BaseException as err:
            temporary.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                kept = "; the previous one is kept" if path.is_file() else ""
                raise DiskFull(f"no space left on device writing {path}{kept}") from err
            raise


# What a failed or interrupted attempt leaves in a job directory besides Hydra's .hydra/ and train.log.
ATTEMPT_FILES = ("results.json", "checkpoints", "csv", "split.json", "plan.json", "similarity.json")


def earlier_attempt(run_dir: Path, cfg: dict, can_resume: bool = True, twins: bool = True) -> tuple[str, dict | None]:
    """What an earlier run of the same sweep left in a job's directory, and what to do with it:

    - ``("done", results)``: a complete ``results.json`` (status ok) of the same settings: kept, not run again;
    - ``("resume", None)``: stopped or killed with a ``last.ckpt``: resumed from it in place (when
      ``can_resume``; a DDP job in its own process tree starts again);
    - ``("fresh", None)``: failed, broken, or stopped before any checkpoint: its files removed, run again;
    - ``("new", None)``: nothing there;
    - ``("twin", path)``: instead of "fresh" or "new", when another finished job of the sweep did this
      job's computation already (``finished_twin``; looked for with ``twins``).

    A complete result of other settings (the conf files changed since) is refused: it is not this job's."""
    results_path, last = run_dir / "results.json", run_dir / "checkpoints" / "last.ckpt"
    if not any((run_dir / name).exists() for name in ATTEMPT_FILES):
        twin = finished_twin(run_dir, cfg) if twins else None
        return ("twin", twin) if twin else ("new", None)
    try:
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
    except (OSError, ValueError):
        results = {"status": "broken"}
    status = (results or {}).get("status", "ok") if isinstance(results, dict) else "broken"
    if results is not None and status == "ok":
        if results.get("settings_digest") == settings_digest(cfg):
            return "done", results
        raise RunDirInUse(f"{run_dir} holds a finished job of other settings than this sweep's job now (the conf "
                          f"files changed?); move it away to run the job again")
    if (status in ("stopped", "killed") or results is None) and last.is_file() and can_resume:
        return "resume", None
    for name in ATTEMPT_FILES:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    twin = finished_twin(run_dir, cfg) if twins else None
    return ("twin", twin) if twin else ("fresh", None)


def finished_twin(run_dir: Path, cfg: dict) -> Path | None:
    """Another job of the same sweep that finished the computation ``cfg`` asks for, or None: only a
    run that takes nothing from its sources (``uses_source``) can have one, e.g. a study's scratch control
    under the second base. Jobs are compared by the ``computation_digest`` their results recorded."""
    if uses_source(cfg):
        return None
    wanted = computation_digest(cfg)
    for other in sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir):
        try:
            results = json.loads((other / "results.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and finished(results) \
                and results.get("computation_digest") == wanted and not results.get("same_as"):
            return other
    return None

