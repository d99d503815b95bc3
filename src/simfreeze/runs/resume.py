"""Exact resume: the random number generators' states travel with every checkpoint, and a resume
must continue the same run (``SameRunOnResume``).

Lightning restores weights, optimizer, scheduler, loops and callbacks from ``ckpt_path``, but not
the RNGs that draw the batch order and the flips, so a resumed run would see other batches than the
uninterrupted one. This callback stores torch's (CPU and CUDA), Python's and NumPy's states in the
checkpoint and puts them back on restore: on CPU a resumed run ends bit for bit where the
uninterrupted run ends (tests/test_reproducibility.py).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from simfreeze.config import resume_differences, run_settings
from simfreeze.errors import ConfigError


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
