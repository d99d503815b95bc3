"""Resume: ``last.ckpt`` and what it must hold. ``LastCheckpoint`` writes it every N epochs, at the
end of training and when a run is stopped; the random number generators' states travel with every
checkpoint, and a resume must continue the same run (``SameRunOnResume``).

Lightning restores weights, optimizer, scheduler, loops and callbacks from ``ckpt_path``, but not
the RNGs that draw the batch order and the flips, so a resumed run would see other batches than the
uninterrupted one. This callback stores torch's (CPU and CUDA), Python's and NumPy's states in the
checkpoint and puts them back on restore: on CPU a resumed run ends bit for bit where the
uninterrupted run ends (tests/test_reproducibility.py).

Every checkpoint is written under a temporary name and renamed into place (``AtomicCheckpointIO``),
so a failed write (a full disk) leaves the previous ``last.ckpt`` as it was.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from simfreeze.config import resume_differences, run_settings
from simfreeze.errors import ConfigError, DiskFull

log = logging.getLogger("simfreeze")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, everything a resume needs, written by Lightning's ``ModelCheckpoint`` every
    ``every_n_epochs`` epochs (0: none on the way) and when the fit is stopped by an exception
    (``save_on_exception``): SIGTERM, which Lightning turns into one at the next batch, Ctrl-C, an
    error. What it lacks is added here: a save when training ends (the last epoch need not be a
    multiple of N); none for a ``ConfigError`` (a diverged run's weights are NaN, a refused restore
    has nothing of its own) or while testing (the module then holds the best weights); a stop in
    ``on_train_epoch_start`` saved as the end of the epoch before, which it is (Lightning 2.6 would
    resume the checkpoint it writes there past that epoch, untrained); and a line saying how to resume."""

    def __init__(self, dirpath: Path, every_n_epochs: int):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, every_n_epochs=every_n_epochs,
                         save_on_exception=True, enable_version_counter=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skipped when this step is saved already
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, ConfigError) or trainer.state.fn != TrainerFn.FITTING:
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
        if trainer.is_global_zero and Path(path).is_file():
            log.warning("stopped (%s) in epoch %d at step %d: resume with ckpt_path=%s", type(exception).__name__,
                        trainer.current_epoch + 1, trainer.global_step, path)


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
    (``simfreeze.config.run_settings``), and a resume whose config differs in any of them (other
    classes, seed, learning rate, plan, …) is refused, naming the keys, instead of continuing the old
    network under the new labels. ``validate_config`` makes the same check before any work; this
    one holds for runs started without it."""

    def __init__(self, cfg: dict):
        self.cfg, self.settings = cfg, run_settings(cfg)

    def state_dict(self) -> dict:
        return {"settings": self.settings}

    def load_state_dict(self, state_dict: dict) -> None:
        differences = resume_differences(state_dict.get("settings", {}), self.cfg)
        if differences:
            raise ConfigError(differences)


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
