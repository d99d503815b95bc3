"""Checks on the composed config that run before any work: an unknown key or value fails with one
clear line. The allowed keys are read from the YAML files in conf/ (they are the schema), not
listed here again; the trainer's come from Lightning's ``Trainer``."""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from simfreeze.errors import ConfigError
from simfreeze.method.plan import FreezeSpec

CONF = Path(__file__).resolve().parents[2] / "conf"
# Passed by the run itself, so not settable from the config.
TRAINER_RESERVED = {"logger", "callbacks", "default_root_dir"}
# Old key → its new name; the old one still works, with one warning line.
DEPRECATED = {("freeze", "depth"): "l_freeze"}
log = logging.getLogger("simfreeze")


def register_resolvers() -> None:
    """``${cuda_count:}`` (conf/hydra/launcher/local_queue.yaml): submitit hides every GPU from a job
    unless told how many to show. Needed before Hydra composes a config that uses it."""
    OmegaConf.register_new_resolver("cuda_count", lambda: __import__("torch").cuda.device_count(), replace=True)


@functools.cache
def schema() -> dict[str, frozenset[str]]:
    """The allowed keys: top level (``""``) and per section, from conf/train.yaml and the group files."""
    primary = OmegaConf.load(CONF / "train.yaml")
    groups = [next(iter(entry)) for entry in primary.defaults if not isinstance(entry, str)]
    keys = {"": frozenset(set(primary) - {"defaults", "hydra"} | set(groups))}
    for section in ("source", "similarity", "freeze", "cache"):
        keys[section] = frozenset(primary[section])
    for group in ("data", "model"):  # every option of the group has the same keys
        keys[group] = frozenset(k for path in (CONF / group).glob("*.yaml") for k in OmegaConf.load(path))
    return keys


def parameter_names(func: Callable) -> set[str]:
    return {name for name in inspect.signature(func).parameters if name != "self"}


def reject_unknown(section: str, keys: Iterable[str], allowed: Iterable[str]) -> None:
    unknown = sorted(set(keys) - set(allowed))
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
    keys = schema()
    reject_unknown("", cfg.keys(), keys[""])  # before the imports: a typo fails at once
    import lightning as L

    for section in ("data", "model", "source", "similarity", "freeze", "cache"):
        reject_unknown(f"{section}.", cfg[section].keys(), keys[section])
    stage, prefix = cfg.source, "source."
    while stage:  # a chain: source.source.… (each stage: task, weights, freeze, source)
        reject_unknown(prefix, stage.keys(), keys["source"])
        if stage.get("task"):
            reject_unknown(f"{prefix}task.", stage.task.keys(), keys["data"])
        if stage.get("freeze"):
            reject_unknown(f"{prefix}freeze.", stage.freeze.keys(), keys["freeze"])
        stage, prefix = stage.get("source"), f"{prefix}source."
    reject_unknown("trainer.", cfg.trainer.keys(), parameter_names(L.Trainer.__init__) - TRAINER_RESERVED)
    precisions = lightning_precisions()
    if str(cfg.trainer.precision) not in precisions:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision} must be one of {', '.join(precisions)}")
    if cfg.progress not in ("auto", "bar", "lines"):
        raise ConfigError(f"progress={cfg.progress} must be one of auto, bar, lines")
    FreezeSpec.from_config(OmegaConf.to_container(cfg.freeze))  # the l_freeze shorthand
    for (section, old), new in DEPRECATED.items():
        if cfg[section].get(old) is not None:
            log.warning("%s.%s is deprecated and will be removed: use %s.%s (the same values)", section, old, section, new)
