"""Checks on the composed config that run before any work: an unknown key or value fails with one
clear line. The allowed keys are read from the YAML files in conf/ (they are the schema), not
listed here again; the trainer's come from Lightning's ``Trainer``."""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from simfreeze.errors import ConfigError
from simfreeze.method.plan import FreezeSpec
from simfreeze.paths import NAME_MAX

CONF = Path(__file__).resolve().parents[2] / "conf"
# Passed by the run itself, so not settable from the config.
TRAINER_RESERVED = {"logger", "callbacks", "default_root_dir"}
# Old key → its new name; the old one still works, with one warning line.
RECIPE_SECTIONS = ("optimizer", "scheduler", "trainer")  # what a source stage's recipe may change
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


# Names other tools use for keys this config names otherwise; a did-you-mean follows them.
KEY_ALIASES = {"learning_rate": "lr", "max_lr": "lr", "wd": "weight_decay", "epochs": "max_epochs",
               "num_epochs": "max_epochs", "steps": "max_steps", "bs": "batch_size", "workers": "num_workers",
               "arch": "name", "architecture": "name", "backbone": "name", "depth": "l_freeze"}


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` when ``name`` is close to one of ``choices`` or is another tool's word for
    one of them (``learning_rate`` → ``lr``); a dotted name is matched by its last part. Empty otherwise."""
    choices = sorted(set(choices))
    leaf = name.rsplit(".", 1)[-1]
    wanted = KEY_ALIASES.get(leaf, leaf)
    by_leaf: dict[str, list[str]] = {}
    for choice in choices:
        by_leaf.setdefault(choice.rsplit(".", 1)[-1], []).append(choice)
    close = difflib.get_close_matches(wanted, list(by_leaf), n=1, cutoff=0.6)
    if wanted in by_leaf:  # an alias, or the right name in the wrong section
        close = [wanted, *(c for c in close if c != wanted)]
    matches = [full for leaf_name in close for full in by_leaf[leaf_name] if full != name][:3]
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


def reject_unknown(section: str, keys: Iterable[str], allowed: Iterable[str]) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        hint = did_you_mean(f"{section}{unknown[0]}", [f"{section}{k}" for k in allowed]) if len(unknown) == 1 else ""
        raise ConfigError(f"unknown key {', '.join(f'{section}{k}' for k in unknown)}{hint}; "
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
    # Unknown keys and values out of range first, before torch and Lightning are imported (5 s or more):
    # a typo or a wrong value fails in under a second.
    reject_unknown("", cfg.keys(), keys[""])
    for section in ("data", "model", "source", "similarity", "freeze", "cache", "checkpoint", "logs"):
        reject_unknown(f"{section}.", cfg[section].keys(), keys[section])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_rules(resolved)
    import lightning as L

    stage, prefix = cfg.source, "source."
    while stage:  # a chain: source.source.… (each stage: task, weights, freeze, seed, source)
        reject_unknown(prefix, stage.keys(), keys["source"])
        if stage.get("task"):
            reject_unknown(f"{prefix}task.", stage.task.keys(), keys["data"])
        if stage.get("freeze"):
            reject_unknown(f"{prefix}freeze.", stage.freeze.keys(), keys["freeze"])
        if stage.get("recipe"):
            reject_unknown(f"{prefix}recipe.", stage.recipe.keys(), RECIPE_SECTIONS)
            reject_unknown(f"{prefix}recipe.trainer.", (stage.recipe.get("trainer") or {}).keys(),
                           parameter_names(L.Trainer.__init__) - TRAINER_RESERVED)
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
    check_construction(resolved)
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


def is_seed(value) -> bool:
    # What L.seed_everything and NumPy take; outside it a run fails late with a traceback.
    return is_int(value) and 0 <= value <= 2**32 - 1


def is_channels(value, positive: bool = False) -> bool:
    """One number per RGB channel (or one for all three): images are decoded as RGB."""
    return (isinstance(value, list) and len(value) in (1, 3) and all(is_number(v) for v in value)
            and (not positive or all(v > 0 for v in value)))


def is_batch_limit(value) -> bool:
    """A Trainer ``limit_*_batches`` that runs something: a count ≥ 1 or a fraction in (0, 1]."""
    return (is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)


# The types and ranges of the values, checked before any work (the keys come from the YAML). A
# value outside them would train wrongly, forever, or fail late with a traceback.
SEED = "an integer in [0, 2**32-1]"
DATA_RULES = {
    "seed": rule(is_seed, SEED),
    "per_class": rule(lambda v: is_int(v) and v >= 2, "an integer ≥ 2"),
    "val_fraction": rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "batch_size": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    "eval_batch_size": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1", optional=True),
    "image_size": rule(lambda v: is_int(v) and 8 <= v <= 1024, "an integer in [8, 1024]", optional=True),
    "flip": rule(lambda v: isinstance(v, bool), "true or false"),
    "crop": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0 (pixels)"),
    "download": rule(lambda v: isinstance(v, bool), "true or false"),
    "use_test": rule(lambda v: isinstance(v, bool), "true or false"),
    "holdout_per_class": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0"),
    "skip_per_class": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0"),
    "train_per_class": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1", optional=True),
    "mean": rule(is_channels, "a list of 3 numbers (one per RGB channel) or of 1"),
    # A std of 0 divides by zero: every input NaN or infinite.
    "std": rule(lambda v: is_channels(v, positive=True), "a list of 3 numbers > 0 (one per RGB channel) or of 1"),
}
RULES = {
    "seed": rule(is_seed, SEED),
    "test": rule(lambda v: isinstance(v, bool), "true or false"),
    "transfer_from": rule(lambda v: isinstance(v, str) and re.fullmatch(r"source(\.source)*", v) is not None,
                          "source, source.source, source.source.source, …"),
    "trainer.max_epochs": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    # Lightning's own checks of these come late (a traceback) or not at all: 0 batches trains or
    # validates nothing and the run would report ok without a result. Stated here, not found by
    # making a Trainer: that looks for accelerators and clusters (not in the sweep preflight).
    "trainer.limit_train_batches": rule(lambda v: v is None or is_batch_limit(v), "an integer ≥ 1, a fraction in "
                                        "(0, 1] or null (0 would train nothing)"),
    "trainer.limit_val_batches": rule(lambda v: v is None or is_batch_limit(v), "an integer ≥ 1, a fraction in "
                                      "(0, 1] or null (0 would never validate: no val/acc, no best.ckpt)"),
    "trainer.limit_test_batches": rule(lambda v: v is None or is_batch_limit(v), "an integer ≥ 1, a fraction in "
                                       "(0, 1] or null (to skip the test: test=false)"),
    "trainer.check_val_every_n_epoch": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1", optional=True),
    "trainer.val_check_interval": rule(lambda v: is_batch_limit(v) or isinstance(v, (str, dict)),
                                       "an integer ≥ 1 (batches), a fraction in (0, 1] of an epoch or a duration",
                                       optional=True),
    "trainer.max_steps": rule(lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer ≥ 1"),
    "trainer.min_steps": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", optional=True),
    "trainer.min_epochs": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", optional=True),
    "trainer.accumulate_grad_batches": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    "trainer.gradient_clip_val": rule(lambda v: is_number(v) and v >= 0, "a number ≥ 0", optional=True),
    "trainer.num_sanity_val_steps": rule(lambda v: is_int(v) and v >= -1, "an integer ≥ -1 (-1: all)", optional=True),
    "trainer.log_every_n_steps": rule(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", optional=True),
    "trainer.num_nodes": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1"),
    "optimizer.lr": rule(lambda v: is_number(v) and v > 0, "a number > 0"),
    "lr_search.rates": rule(lambda v: isinstance(v, list) and len(set(v)) == len(v) >= 2
                            and all(is_number(x) and x > 0 for x in v),
                            "a list of at least two different learning rates > 0, e.g. [2.0e-4,6.3e-4,2.0e-3]",
                            optional=True),
    "lr_search.rung": rule(lambda v: is_int(v) and v >= 1, "an integer ≥ 1 (steps)", optional=True),
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
    "checkpoint.keep": rule(lambda v: isinstance(v, bool), "true or false"),
    **{f"data.{key}": value for key, value in DATA_RULES.items()},
}


def check_rules(cfg: dict) -> None:
    """The value rules (``RULES``, each source task's ``DATA_RULES``, its recipe's) on the resolved config:
    pure checks that need neither torch nor Lightning."""
    def get(path: str):
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return KeyError
            node = node[part]
        return node

    check_finite(cfg)  # first: NaN passes every comparison of the rules below as false, inf most as true
    for key, (ok, allowed) in RULES.items():
        value = get(key)
        if value is not KeyError and not ok(value):
            raise ConfigError(f"{key}={json.dumps(value)} must be {allowed}")
    check_validation_cadence(cfg["trainer"])
    search, max_steps = cfg.get("lr_search") or {}, cfg["trainer"].get("max_steps") or -1
    if search.get("rates") and max_steps > 0 and (search.get("rung") or 1) >= max_steps:
        raise ConfigError(f"lr_search.rung={search.get('rung')} must be below trainer.max_steps={max_steps}: the best "
                          f"rate at the rung goes on to the end (a rung at the end is a sweep: optimizer.lr=a,b,c)")
    stage, prefix = cfg["source"], "source."
    while stage:
        if stage.get("seed") is not None and not is_seed(stage["seed"]):
            raise ConfigError(f"{prefix}seed={json.dumps(stage['seed'])} must be {RULES['seed'][1]} or null")
        for key, value in (stage.get("task") or {}).items():
            if key in DATA_RULES and not DATA_RULES[key][0](value):
                raise ConfigError(f"{prefix}task.{key}={json.dumps(value)} must be {DATA_RULES[key][1]}")
        for section, keys in (stage.get("recipe") or {}).items():
            for key, value in (keys or {}).items():
                ok, allowed = RULES.get(f"{section}.{key}", (None, None))
                if ok is not None and not ok(value):
                    raise ConfigError(f"{prefix}recipe.{section}.{key}={json.dumps(value)} must be {allowed}")
        stage, prefix = stage.get("source"), f"{prefix}source."


def check_values(cfg: dict) -> None:
    """Every value of ``RULES`` present in the resolved config ``cfg``, each source task's data too,
    the optimizer's keys against its class, and the devices and folders the run needs."""
    check_rules(cfg)
    check_construction(cfg)


def check_construction(cfg: dict) -> None:
    """What takes the classes to check: the model's kwargs, the optimizer's, scheduler's and loggers' keys
    against their classes; then the devices and folders the run needs."""
    check_model_kwargs(cfg["model"].get("kwargs"))
    check_factory("optimizer", cfg.get("optimizer"))
    check_factory("scheduler", cfg.get("scheduler"), given_by_the_run={"optimizer", "total_steps"})
    check_by_construction(cfg.get("optimizer"), cfg.get("scheduler"))
    check_fp16_eps(str(cfg["trainer"].get("precision")), cfg.get("optimizer"))
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
    # A read-only cache may serve the sources it holds; one it lacks is refused when it is needed (runs/sources.py).
    check_writable_folder("source.cache_dir", cfg["source"]["cache_dir"], writable=False)
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


def non_finite(node, key: str = "") -> tuple[str, float] | None:
    """The first NaN or ±inf anywhere in ``node`` (a resolved config) and its key, e.g.
    ``("data.std[1]", nan)``; None when every float is finite."""
    if isinstance(node, dict):
        children = [(value, f"{key}.{k}" if key else str(k)) for k, value in node.items()]
    elif isinstance(node, (list, tuple)):
        children = [(value, f"{key}[{i}]") for i, value in enumerate(node)]
    else:
        return (key, node) if isinstance(node, float) and not math.isfinite(node) else None
    for value, child_key in children:
        found = non_finite(value, child_key)
        if found:
            return found
    return None


def check_finite(cfg: dict) -> None:
    """No setting anywhere may be NaN or infinite: ``optimizer.lr=inf`` passes "> 0" and trains NaN
    weights, a NaN passes no comparison and so slips past every range a check states as a refusal."""
    found = non_finite(cfg)
    if found:
        raise ConfigError(f"{found[0]}={found[1]} must be a finite number")


def check_model_kwargs(kwargs) -> None:
    """``model.kwargs`` go to the network's constructor through ``build_network``, which sets the
    head's size and the weights itself: the same names again would fail there with a traceback. The
    constructor's own refusals (an unknown argument) come as one line when the network is built."""
    from simfreeze.networks.build import build_network

    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.kwargs={json.dumps(kwargs)} must be a mapping of the network's arguments, e.g. {{}}")
    taken = sorted(set(kwargs) & (parameter_names(build_network) - {"kwargs"}))
    if taken:
        raise ConfigError(f"model.kwargs may not set {', '.join(taken)}: the run sets them (num_classes from the "
                          f"task's classes, weights from model.weights, head_init from model.head_init)")


def check_validation_cadence(trainer: dict) -> None:
    """A run that never validates has no val/acc and no best.ckpt, and would report ok without a result."""
    every, epochs = trainer.get("check_val_every_n_epoch", 1), trainer.get("max_epochs")
    if every is not None and is_int(epochs) and every > epochs:
        raise ConfigError(f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={epochs}: the run "
                          f"would never validate; use a value ≤ {epochs}")
    interval = trainer.get("val_check_interval")
    if every is None and not ((is_int(interval) and interval >= 1) or isinstance(interval, (str, dict))):
        raise ConfigError(f"trainer.check_val_every_n_epoch=null validates every trainer.val_check_interval batches, "
                          f"which must then be an integer ≥ 1 (or a duration), not {json.dumps(interval)}")


def wants_total_steps(factory) -> bool:
    """OneCycleLR-style schedulers need the run's step count, which only the Trainer knows (the module
    gives it; the check by construction below gives a stand-in)."""
    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {})
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "total_steps" in params and keywords.get("total_steps") is None


def check_fp16_eps(precision: str, optimizer: dict | None) -> None:
    """``16-true`` keeps the optimizer's state in fp16, where Adam's default ``eps`` (1e-8) is 0: a
    second moment that underflows to 0 then divides by 0 and the weights become NaN in a few steps."""
    if precision != "16-true" or not optimizer or "_target_" not in optimizer:
        return
    import torch
    from hydra.utils import get_class

    default = inspect.signature(get_class(optimizer["_target_"]).__init__).parameters.get("eps")
    eps = optimizer.get("eps", default.default if default is not None else None)
    if is_number(eps) and eps > 0 and float(torch.tensor(eps, dtype=torch.float16)) == 0:
        raise ConfigError(f"trainer.precision=16-true keeps the optimizer's state in fp16, where optimizer.eps={eps} "
                          f"is 0 (the weights become NaN where a gradient is 0): give +optimizer.eps=1e-4, or use "
                          f"trainer.precision=16-mixed")


# Stands in for the run's step count when a scheduler needs one (OneCycleLR): the fewest the run gives.
PROBE_TOTAL_STEPS = 10


def check_by_construction(optimizer: dict | None, scheduler: dict | None) -> None:
    """The optimizer and the scheduler made as the run makes them, on one CPU parameter: their own
    range checks (torch's "Invalid learning rate", OneCycleLR's pct_start, a negative momentum, …)
    become one line naming the section instead of a traceback once the run has started. Takes a
    millisecond and never touches a GPU (the sweep preflight runs it on the launching machine)."""
    if not optimizer or "_target_" not in optimizer:
        return
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    def refused(section: str, node: dict, err: Exception) -> ConfigError:
        text = " ".join(str(err).split()) or type(err).__name__
        return ConfigError(f"{section}: {node['_target_']} refuses these values: {text[:300]}")

    try:
        with warnings.catch_warnings():  # e.g. a scheduler made before any optimizer step
            warnings.simplefilter("ignore")
            made = instantiate(optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError, InstantiationException) as err:
        raise refused("optimizer", optimizer, err) from None
    if not scheduler or "_target_" not in scheduler:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factory = instantiate(scheduler)
            factory(made, **({"total_steps": PROBE_TOTAL_STEPS} if wants_total_steps(factory) else {}))
    except (ValueError, TypeError, InstantiationException) as err:
        raise refused("scheduler", scheduler, err) from None
    except ArithmeticError:  # OneCycleLR's phases at this step count (pct_start=0.1: 0/0): not a range,
        pass  # and the run's count is another


def check_writable_folder(key: str, folder: str, writable: bool = True) -> None:
    """``folder`` is a folder, or can be made one (``writable``: and written in): no file in its place,
    no name over the file system's limit, no symlink loop."""
    path = Path(folder).expanduser()
    long = next((part for part in path.parts if len(part.encode()) > NAME_MAX), None)
    if long is not None:
        raise ConfigError(f"{key}: the name '{long[:40]}…' is {len(long.encode())} bytes; a file system allows "
                          f"{NAME_MAX} per name")
    try:
        path.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # RuntimeError: Python 3.11's "Symlink loop"
        raise ConfigError(f"{key}='{folder}' cannot be followed: {err}") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}='{folder}' is a file, not a folder")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}='{folder}': {existing} is a file, not a folder")
    if writable and not os.access(existing, os.W_OK):
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


# What each key does, in one place: (it may change a source stage's weights, so it is in the stage's cache
# key; it may differ between a run and its resume, being where things are or how the run is shown or spread,
# not what it computes). A key takes its own entry, else its section's (``key_role``); a key in neither is
# (True, False). The images under data.root are compared by a digest on resume instead
# (simfreeze.runs.resume.SameRunOnResume).
KEY_ROLES: dict[str, tuple[bool, bool]] = {
    # how the run is named, shown and stored
    "name": (False, True), "progress": (False, True), "verbose": (False, True), "logger": (False, True),
    "logs": (False, True), "test": (False, True), "ckpt_path": (False, True), "cache": (False, True),
    "checkpoint": (False, True), "source.cache_dir": (False, True),
    # what the target run does with its source; a source stage never computes S, and only a stage that
    # transfers itself freezes (then freeze and transfer join its key: simfreeze.runs.sources.source_key)
    "arm": (False, False), "similarity": (False, False), "freeze": (False, False), "transfer": (False, False),
    "source_only": (False, False), "transfer_from": (False, False), "lr_search": (False, False),
    # where the images are (their digest is checked on resume): in the cache key since the first caches
    "data.root": (True, True), "data.download": (True, True), "data.download_dir": (True, True),
    # what is evaluated, not what is learned
    "data.eval_batch_size": (False, True), "data.use_test": (False, False), "data.holdout_per_class": (False, False),
    # how the network runs, not what it learns (up to rounding)
    "model.compile": (False, True), "model.channels_last": (False, False),
    # where and how the trainer runs: a source trains on one device, the job's own
    **{f"trainer.{key}": (False, True) for key in ("devices", "accelerator", "num_nodes", "strategy", "enable_progress_bar",
                                                    "enable_model_summary", "log_every_n_steps", "num_sanity_val_steps")},
}


def key_role(key: str) -> tuple[bool, bool]:
    """``KEY_ROLES`` of a dotted key: its own entry, else its section's, else (True, False)."""
    while key:
        if key in KEY_ROLES:
            return KEY_ROLES[key]
        key = key.rpartition(".")[0]
    return True, False


# Keys added after runs were made, at the value that computes what those runs computed: left out of the
# settings, so a finished job of an older sweep keeps its digest and a checkpoint from before resumes.
ADDED_LATER = {"lr_search.rates": None, "lr_search.rung": None}


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def run_settings(cfg: dict) -> dict[str, str]:
    """The settings that decide what a run computes, flattened, as text (a checkpoint keeps them);
    ``precision=auto`` as the precision it runs."""
    from simfreeze.speed.precision import with_resolved_precision

    cfg = with_resolved_precision(cfg)

    return {key: repr(value) for key, value in flatten(cfg).items()
            if not key_role(key)[1] and not (key in ADDED_LATER and value == ADDED_LATER[key])}


def settings_digest(cfg: dict) -> str:
    """A short hash of the settings that decide what a run computes (``run_settings``): a job of a
    sweep run again is the same job when it has the same digest. ``results.json`` records it."""
    return hashlib.sha256(json.dumps(run_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def uses_source(cfg: dict) -> bool:
    """Whether anything of the run comes from its chain of sources: its weights (``transfer``), its
    report (``source_only``), S (an embedder of the chain) or the similarity analysis."""
    return bool(cfg.get("transfer") or cfg.get("source_only") or cfg["similarity"].get("analysis")
                or cfg["similarity"].get("enabled") or FreezeSpec.from_config(cfg["freeze"]).needs_similarity)


def computation_digest(cfg: dict) -> str:
    """``settings_digest`` of what the run computes: a run that takes nothing from its sources (``uses_source``)
    computes the same whatever they are, e.g. the scratch control of a study under either base."""
    if uses_source(cfg):
        return settings_digest(cfg)
    return settings_digest({**cfg, "source": None, "similarity": None, "transfer_from": None})


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
