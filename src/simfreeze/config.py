"""Checks on the composed config that run before any work: an unknown key or value fails with one
clear line. The allowed keys are read from the YAML files in conf/ (they are the schema), not
listed here again; the trainer's come from Lightning's ``Trainer``."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import warnings
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
    """For conf/hydra/launcher/local_queue.yaml: ``${cuda_count:}``, the number of visible GPUs, and
    ``${keep_visible_gpus:}``, the shell lines that give a submitit local job this process's
    ``CUDA_VISIBLE_DEVICES`` (submitit would set ``0..n-1``). Needed before Hydra composes a config
    that uses them."""
    from simfreeze.speed.placement import keep_visible_devices

    OmegaConf.register_new_resolver("cuda_count", lambda: __import__("torch").cuda.device_count(), replace=True)
    OmegaConf.register_new_resolver("keep_visible_gpus", keep_visible_devices, replace=True)


@functools.cache
def schema() -> dict[str, frozenset[str]]:
    """The allowed keys: top level (``""``) and per section, from conf/train.yaml and the group files."""
    primary = OmegaConf.load(CONF / "train.yaml")
    groups = [next(iter(entry)) for entry in primary.defaults if not isinstance(entry, str)]
    keys = {"": frozenset(set(primary) - {"defaults", "hydra"} | set(groups))}
    for section in ("source", "similarity", "freeze", "cache", "checkpoint", "logs"):
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

    for section in ("data", "model", "source", "similarity", "freeze", "cache", "checkpoint", "logs"):
        reject_unknown(f"{section}.", cfg[section].keys(), keys[section])
    stage, prefix = cfg.source, "source."
    while stage:  # a chain: source.source.… (each stage: task, weights, freeze, seed, source)
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
    if not isinstance(cfg.verbose, bool):
        raise ConfigError(f"verbose={cfg.verbose} must be true or false")
    FreezeSpec.from_config(OmegaConf.to_container(cfg.freeze))  # the l_freeze shorthand
    check_values(OmegaConf.to_container(cfg, resolve=True))
    for (section, old), new in DEPRECATED.items():
        if cfg[section].get(old) is not None:
            warnings.warn(f"{section}.{old} is deprecated and will be removed: use {section}.{new} (the same values)",
                          FutureWarning, stacklevel=2)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rule(test: Callable[[object], bool], allowed: str, optional: bool = False):
    return (lambda value: (optional and value is None) or test(value)), allowed + (" or null" if optional else "")


# The types and ranges of the values, checked before any work (the keys come from the YAML). A
# value outside them would train wrongly, forever, or fail late with a traceback.
DATA_RULES = {
    "seed": rule(is_int, "an integer"),
    "per_class": rule(lambda v: is_int(v) and v >= 2, "an integer ≥ 2"),
    "val_fraction": rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "batch_size": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    "eval_batch_size": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1", optional=True),
    "image_size": rule(lambda v: is_int(v) and 8 <= v <= 1024, "an integer in [8, 1024]", optional=True),
    "flip": rule(lambda v: isinstance(v, bool), "true or false"),
    "download": rule(lambda v: isinstance(v, bool), "true or false"),
    "use_test": rule(lambda v: isinstance(v, bool), "true or false"),
    "holdout_per_class": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0"),
    "skip_per_class": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0"),
}
RULES = {
    "seed": rule(is_int, "an integer"),
    "test": rule(lambda v: isinstance(v, bool), "true or false"),
    "transfer_from": rule(lambda v: isinstance(v, str) and re.fullmatch(r"source(\.source)*", v) is not None,
                          "source, source.source, source.source.source, …"),
    "trainer.max_epochs": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    "optimizer.lr": rule(lambda v: is_number(v) and v > 0, "a number > 0"),
    "optimizer.weight_decay": rule(lambda v: is_number(v) and v >= 0, "a number ≥ 0"),
    "model.label_smoothing": rule(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.channels_last": rule(lambda v: isinstance(v, bool), "true or false"),
    "model.compile": rule(lambda v: isinstance(v, bool), "true or false"),
    "freeze.k": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", optional=True),
    "freeze.l_total": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", optional=True),
    "freeze.low": rule(is_number, "a number"),
    "freeze.high": rule(is_number, "a number"),
    "cache.enabled": rule(lambda v: isinstance(v, bool), "true or false"),
    "cache.budget_gb": rule(lambda v: is_number(v) and v >= 0, "a number ≥ 0"),
    "similarity.enabled": rule(lambda v: isinstance(v, bool), "true or false"),
    "similarity.scores": rule(lambda v: isinstance(v, bool), "true or false"),
    "checkpoint.last_every_n_epochs": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0"),
    "checkpoint.keep_frozen": rule(lambda v: isinstance(v, bool), "true or false"),
    **{f"data.{key}": value for key, value in DATA_RULES.items()},
}


def check_values(cfg: dict) -> None:
    """Every value of ``RULES`` present in the resolved config ``cfg``, each source task's data too,
    the optimizer's keys against its class, and the devices and folders the run needs."""
    def get(path: str):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return KeyError
            node = node[part]
        return node

    for key, (ok, allowed) in RULES.items():
        value = get(key)
        if value is not KeyError and not ok(value):
            raise ConfigError(f"{key}={json.dumps(value)} must be {allowed}")
    stage, prefix = cfg["source"], "source."
    while stage:
        if stage.get("seed") is not None and not is_int(stage["seed"]):
            raise ConfigError(f"{prefix}seed={json.dumps(stage['seed'])} must be {RULES['seed'][1]} or null")
        for key, value in (stage.get("task") or {}).items():
            if key in DATA_RULES and not DATA_RULES[key][0](value):
                raise ConfigError(f"{prefix}task.{key}={json.dumps(value)} must be {DATA_RULES[key][1]}")
        stage, prefix = stage.get("source"), f"{prefix}source."
    check_factory("optimizer", cfg.get("optimizer"))
    check_factory("scheduler", cfg.get("scheduler"), given_by_the_run={"optimizer", "total_steps"})
    for kind, node in (cfg.get("logger") or {}).items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"logger.{kind} must name a Lightning logger class in _target_ (conf/logger/)")
        check_factory(f"logger.{kind}", node, given_by_the_run=frozenset())
    for key in ("dir", "name"):
        if cfg["logs"][key] is not None and not isinstance(cfg["logs"][key], str):
            raise ConfigError(f"logs.{key}={json.dumps(cfg['logs'][key])} must be a string or null")
    if cfg["logs"]["dir"]:
        check_writable_folder("logs.dir", cfg["logs"]["dir"])
    accelerator = str(cfg["trainer"].get("accelerator"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
                              f"(trainer.accelerator=auto uses one where there is one)")
    check_writable_folder("source.cache_dir", cfg["source"]["cache_dir"])
    check_resume_path(cfg.get("ckpt_path"), cfg)


def check_factory(section: str, node: dict | None, given_by_the_run: set[str] = frozenset({"params"})) -> None:
    """Keys of an ``_target_`` section (the optimizer, the scheduler) that its class does not take."""
    if not node or "_target_" not in node:
        return
    from hydra.utils import get_class

    try:
        target = get_class(node["_target_"])
    except Exception as err:  # not importable: Hydra would fail later with a traceback
        raise ConfigError(f"{section}._target_={node['_target_']}: no such class ({err})") from None
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target.__init__).parameters.values()):
        return  # it hands other keys on (W&B's to wandb.init): theirs to check
    allowed = parameter_names(target.__init__) - given_by_the_run
    reject_unknown(f"{section}.", [k for k in node if not k.startswith("_")], allowed)


def check_writable_folder(key: str, folder: str) -> None:
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}='{folder}' is a file, not a folder")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{key}='{folder}': {existing} is not writable")


def check_resume_path(ckpt_path: str | None, cfg: dict | None = None) -> None:
    """A resume checkpoint must be a readable checkpoint file of the same run (``resume_differences``):
    Lightning's special names (``last``, ``hpc``, ``registry``) would train from scratch or fail late."""
    if ckpt_path is None:
        return
    from simfreeze.networks.build import load_checkpoint

    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "no such checkpoint file"
        raise ConfigError(f"ckpt_path='{ckpt_path}': {why} (resume from <run dir>/checkpoints/last.ckpt)")
    checkpoint = load_checkpoint(path, "ckpt_path", mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "optimizer_states" not in checkpoint:
        raise ConfigError(f"ckpt_path='{ckpt_path}' is not a checkpoint to resume from (give a run's "
                          f"checkpoints/last.ckpt; best.ckpt holds weights only)")
    stored = next((state.get("settings") for name, state in (checkpoint.get("callbacks") or {}).items()
                   if name.startswith("SameRunOnResume")), None)
    differences = resume_differences(stored, cfg) if stored is not None and cfg is not None else None
    if differences:
        raise ConfigError(differences)


# Keys that may differ between a run and its resume: where things are and how the run is shown or
# spread, not what it computes. The images under data.root are compared by a digest instead
# (simfreeze.runs.resume.SameRunOnResume).
FREE_ON_RESUME = {"ckpt_path", "name", "progress", "verbose", "logger", "logs", "test", "cache", "checkpoint", "source.cache_dir", "data.root", "data.download",
                  "data.download_dir", "data.eval_batch_size", "model.compile", "trainer.devices",
                  "trainer.accelerator", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
                  "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps"}


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def run_settings(cfg: dict) -> dict[str, str]:
    """The settings that decide what a run computes, flattened, as text (a checkpoint keeps them);
    ``precision=auto`` as the precision it runs."""
    from simfreeze.speed.precision import with_resolved_precision

    cfg = with_resolved_precision(cfg)

    def free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in FREE_ON_RESUME)
    return {key: repr(value) for key, value in flatten(cfg).items() if not free(key)}


def resume_differences(stored: dict[str, str], cfg: dict) -> str | None:
    """Why a resume of a checkpoint with ``stored`` settings under ``cfg`` is not the same run, or None."""
    current = run_settings(cfg)
    differ = sorted(key for key in stored.keys() | current.keys() if stored.get(key) != current.get(key))
    if not differ:
        return None
    shown = ", ".join(f"{k} ({stored.get(k, '–')} → {current.get(k, '–')})" for k in differ[:6])
    more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
    return (f"ckpt_path: the checkpoint's run had other settings: {shown}{more}; resume with the settings it was "
            f"trained with, or start a new run without ckpt_path")
