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


# Keys that may differ between a run and its resume: where things are and how the run is shown or
# spread, not what it computes.
FREE_ON_RESUME = {"ckpt_path", "name", "progress", "test", "cache", "source.cache_dir", "data.root", "data.download",
                  "data.download_dir", "data.eval_batch_size", "model.compile", "trainer.devices",
                  "trainer.accelerator", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
                  "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps"}


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def run_settings(cfg: dict) -> dict[str, str]:
    """The settings that decide what a run computes, flattened, as text (the checkpoint keeps them)."""
    def free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in FREE_ON_RESUME)
    return {key: repr(value) for key, value in flatten(cfg).items() if not free(key)}


class SameRunOnResume(L.Callback):
    """A resume continues the run its checkpoint came from: the checkpoint keeps the run's settings
    and a resume whose config differs in any of them (other classes, seed, learning rate, plan, …)
    is refused, naming the keys, instead of continuing the old network under the new labels."""

    def __init__(self, cfg: dict):
        self.settings = run_settings(cfg)

    def state_dict(self) -> dict:
        return {"settings": self.settings}

    def load_state_dict(self, state_dict: dict) -> None:
        stored = state_dict.get("settings", {})
        differ = sorted(key for key in stored.keys() | self.settings.keys() if stored.get(key) != self.settings.get(key))
        if differ:
            shown = ", ".join(f"{k} ({stored.get(k, '–')} → {self.settings.get(k, '–')})" for k in differ[:6])
            more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            raise ConfigError(f"ckpt_path: the checkpoint's run had other settings: {shown}{more}; resume with the "
                              f"settings it was trained with, or start a new run without ckpt_path")
