"""Exact resume: the random number generators' states travel with every checkpoint.

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


class RandomStateCallback(L.Callback):
    def state_dict(self) -> dict:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # NumPy's key is an array: stored as a list so the checkpoint loads with weights_only=True.
        name, key, *rest = states["numpy"]
        return {**states, "numpy": (name, key.tolist(), *rest)}

    def load_state_dict(self, state_dict: dict) -> None:
        name, key, *rest = state_dict["numpy"]
        _set_rng_states({**state_dict, "numpy": (name, np.array(key, dtype=np.uint32), *rest)})
