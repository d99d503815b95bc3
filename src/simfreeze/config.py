"""Checks on the composed config that run before any work: unknown keys fail with one clear line."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A setting that cannot work. The message names the key, the value and what is allowed."""


TOP_LEVEL_KEYS = {"data", "model", "optimizer", "scheduler", "trainer", "name", "seed", "ckpt_path",
                  "test", "progress", "arm", "transfer", "source_only", "source", "similarity", "freeze", "cache"}
SECTION_KEYS = {
    "source": {"task", "weights", "freeze", "source", "cache_dir"},
    "similarity": {"enabled", "embedder", "source_classes", "target_classes", "matrix", "analysis"},
    "freeze": {"policy", "k", "low", "high", "fallback", "l_total", "depth"},
    "cache": {"enabled", "budget_gb"},
}
MODEL_KEYS = {"arch", "weights", "kwargs", "head_init", "channels_last", "compile", "label_smoothing"}
# Passed by train.py itself, so not settable from the config.
TRAINER_RESERVED = {"logger", "callbacks", "default_root_dir"}


def parameter_names(func: Callable) -> set[str]:
    return {name for name in inspect.signature(func).parameters if name != "self"}


def reject_unknown(section: str, keys: Iterable[str], allowed: set[str]) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {', '.join(f'{section}{k}' for k in unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def lightning_precisions() -> list[str]:
    """``auto`` and every value Lightning's Trainer accepts for ``precision`` (as strings)."""
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT

    def flatten(hint):
        args = get_args(hint)
        return [v for a in args for v in flatten(a)] if args else [hint]
    return ["auto", *dict.fromkeys(str(v) for v in flatten(_PRECISION_INPUT))]


def validate_config(cfg: DictConfig) -> None:
    reject_unknown("", cfg.keys(), TOP_LEVEL_KEYS)  # before the imports: a typo fails at once
    import lightning as L

    from simfreeze.data import TaskDataModule

    reject_unknown("data.", cfg.data.keys(), parameter_names(TaskDataModule.__init__))
    reject_unknown("model.", cfg.model.keys(), MODEL_KEYS)
    for section, allowed in SECTION_KEYS.items():
        reject_unknown(f"{section}.", cfg[section].keys(), allowed)
    stage, prefix = cfg.source, "source."
    while stage:  # a chain: source.source.… (each stage: task, weights, freeze, source)
        reject_unknown(prefix, stage.keys(), SECTION_KEYS["source"])
        if stage.get("task"):
            reject_unknown(f"{prefix}task.", stage.task.keys(), parameter_names(TaskDataModule.__init__))
        if stage.get("freeze"):
            reject_unknown(f"{prefix}freeze.", stage.freeze.keys(), SECTION_KEYS["freeze"])
        stage, prefix = stage.get("source"), f"{prefix}source."
    reject_unknown("trainer.", cfg.trainer.keys(), parameter_names(L.Trainer.__init__) - TRAINER_RESERVED)
    precisions = lightning_precisions()
    if str(cfg.trainer.precision) not in precisions:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision} must be one of {', '.join(precisions)}")
    if cfg.progress not in ("auto", "bar", "lines"):
        raise ConfigError(f"progress={cfg.progress} must be one of auto, bar, lines")


