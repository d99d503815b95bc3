"""Source models: the chain of source stages a run transfers from, the rules of their cache key, the
leakage check, and training each stage once.

A source *task* (e.g. the paper's cat model) is trained with the target's recipe on the source
task's data (``source_config``). A source may have a source of its own (``source.source``: a
chain of stages, the staged AlexNet paper); it then trains from that one with ``source.freeze``,
and so on up the chain.

Each stage is trained into ``<cache_dir>/<name>-<key>/``. The key hashes the stage's resolved run
config minus the keys that cannot change its weights (``simfreeze.config.KEY_ROLES``). Training happens in a
temporary directory under an exclusive file lock and is renamed into place when complete, so
parallel jobs that need the same source train it once and never read a half-written one.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from simfreeze.config import key_role
from simfreeze.data.splits import shared_images
from simfreeze.errors import ConfigError, RunWithoutResult, SourceFailed, TrainingDiverged
from simfreeze.paths import safe_name
from simfreeze.runs.loggers import stage_logs
from simfreeze.runs.results import run_name
from simfreeze.speed.precision import with_resolved_precision

log = logging.getLogger("simfreeze")

ADDED_LATER = {"train_per_class": None, "crop": 0}

TrainFn = Callable[[dict, Path], dict]  # trains a run config into a directory, returns its results


def source_config(cfg: dict) -> dict:
    """The run config that trains ``cfg``'s source task: the target's recipe on the source's data."""
    spec = cfg["source"]
    # The precision that runs, not "auto": it is part of the cache key (a run plan's config is resolved already).
    source = copy.deepcopy(with_resolved_precision(cfg) if cfg["trainer"]["precision"] == "auto" else cfg)
    if "classes" in spec["task"]:  # a task of its own classes: the target's labelling does not carry over
        source["data"].update(positive=None, groups={})
    source["data"].update(spec["task"])
    inner = spec.get("source")  # the source's own source, if this stage transfers too
    source.update(arm="source", name=None, transfer=bool(inner), transfer_from="source", source_only=False,
                  ckpt_path=None)
    if spec.get("seed") is not None:  # e.g. one pretrained base for every seed of the targets
        source["seed"] = spec["seed"]
    apply_recipe(source, spec.get("recipe"))
    source["freeze"].update(policy="none", l_freeze=None, depth=None)
    if inner:
        source["freeze"].update(spec.get("freeze") or {})
    source["similarity"].update(enabled=False, analysis=False)
    source["lr_search"] = {"rates": None, "rung": None}  # a source trains at its recipe's rate
    # Logged beside the job that trains it (source:cat/seed=0 in the sweep's TensorBoard)
    source["logs"] = stage_logs(cfg.get("logs") or {"dir": None}, run_name(source), source["seed"])
    # Its last.ckpt is the next stage's initial weights: whole, frozen prefix included.
    source["checkpoint"].update(keep_frozen=True, keep=True)
    source["source"] = {"task": None, "weights": None, "freeze": None, "source": None, "seed": None, "recipe": None,
                        **(inner or {}),
                        "cache_dir": spec["cache_dir"]}
    # One device: a multi-device source started inside a DDP target run would relaunch the whole
    # command, whose processes would then wait on the source's lock held by their own parent.
    source["trainer"].update(devices=source_device(cfg["trainer"]["devices"]), num_nodes=1, strategy="auto")
    return source


def apply_recipe(stage: dict, recipe: dict | None) -> None:
    """Merge a stage's own ``recipe`` (optimizer / scheduler / trainer keys) onto the recipe it took
    from the target. A one-cycle ``max_lr`` that followed the target's ``optimizer.lr`` (as
    conf/scheduler/onecycle.yaml has it) follows the recipe's learning rate instead."""
    if not recipe:
        return
    follows = stage.get("scheduler") and stage["scheduler"].get("max_lr") == stage["optimizer"].get("lr")
    for section, keys in recipe.items():
        stage[section] = {**(stage.get(section) or {}), **keys}
    if follows and "lr" in recipe.get("optimizer", {}) and "max_lr" not in recipe.get("scheduler", {}):
        stage["scheduler"]["max_lr"] = stage["optimizer"]["lr"]


def source_device(devices) -> Any:
    """The one device a source stage trains on: the target's own when it was given as a list (a
    sweep job pinned to ``[i]`` by simfreeze.speed.placement; the first of a DDP run's), else
    ``devices=1``, which is cuda:0 on a GPU machine: another sweep job's GPU."""
    if isinstance(devices, (list, tuple)) and devices:
        return [devices[0]]
    return 1


def source_chain(cfg: dict) -> list[dict]:
    """The run configs of the source stages, nearest first (empty for a run without a source task)."""
    chain = []
    while cfg["source"]["task"]:
        cfg = source_config(cfg)
        chain.append(cfg)
    return chain


def chain_stage(cfg: dict, path: str, key: str, chain: list[dict] | None = None) -> dict:
    """The config whose ``source`` is the chain stage ``path`` names: ``source`` → ``cfg`` itself,
    ``source.source`` (the source's own source, e.g. a pretrained base) → the source's config, …
    ``key`` names the setting in errors; ``chain``: ``source_chain(cfg)`` when the caller has it."""
    depth = path.count("source")
    if path != ".".join(["source"] * depth) or depth == 0:
        raise ConfigError(f"{key}={path} must be source, source.source, source.source.source, …")
    stage = cfg
    for level in range(depth):
        if not (stage["source"]["task"] or (level == depth - 1 and stage["source"]["weights"])):
            missing = "source." * (level + 1)
            what = (f"arm={cfg['arm']} starts from a source model ({key}={path})" if key == "transfer_from" else
                    f"{key}={path} names a model of the chain of sources")
            raise ConfigError(f"{what}, and neither {missing}task nor {missing}weights is set: give one (e.g. "
                              f"+{missing}task.positive=cat, or {missing}weights=IMAGENET1K_V2 or a checkpoint)")
        if level < depth - 1:
            stage = chain[level] if chain is not None else source_config(stage)
    return stage


def source_key(run_cfg: dict[str, Any]) -> str:
    """A short stable hash of the parts of a resolved run config that determine the weights."""
    relevant = {k: v for k, v in run_cfg.items() if key_role(k)[0]}  # config.KEY_ROLES: what may change weights
    if run_cfg.get("transfer"):  # a stage of a chain: it trains from its own source with a freeze plan
        relevant.update(transfer=True, freeze=run_cfg["freeze"])
    for section in ("trainer", "data", "source", "model"):
        relevant[section] = {k: v for k, v in run_cfg.get(section, {}).items() if key_role(f"{section}.{k}")[0]}
    # A key added later with its default value is left out too: earlier caches keep their keys; so is an
    # unset stage seed or recipe, for caches made before those keys existed.
    relevant["data"] = {k: v for k, v in relevant["data"].items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}
    relevant["source"] = {k: v for k, v in relevant["source"].items() if not (k in ("seed", "recipe") and v is None)}
    if relevant["data"].get("root"):
        relevant["data"]["root"] = str(Path(relevant["data"]["root"]).expanduser().resolve())
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_no_leakage(cfg: dict, target_split, plan_split: Callable[[dict], Any], chain: list[dict] | None = None) -> None:
    """No source stage may have trained on an image the target validates on.

    ``plan_split(data_cfg)`` gives a task's split without decoding images; ``chain``: ``source_chain(cfg)``
    when the caller has it."""
    for stage, stage_cfg in enumerate(source_chain(cfg) if chain is None else chain, 1):
        source_data = stage_cfg["data"]
        if (source_data["root"], source_data["dataset"]) != (cfg["data"]["root"], cfg["data"]["dataset"]):
            continue  # different data: nothing to share
        overlap = shared_images(plan_split(source_data), target_split)
        if overlap:
            counts = {name: len(idx) for name, idx in overlap.items()}
            where = "the source task" if stage == 1 else f"source stage {stage} (source.{'source.' * (stage - 1)}task)"
            raise ConfigError(f"{where} trains on {counts} images of the target's validation split; "
                              f"use the same data.seed/per_class/val_fraction for both, or disjoint classes")


@contextlib.contextmanager
def exclusive_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder_name(name: str) -> str:
    """``name`` as one safe folder name (``simfreeze.paths``): class and group names are the user's
    and may hold ``/`` or ``..``, which must never lead outside ``source.cache_dir``."""
    return safe_name(name, fallback="source", max_length=80)


def read_cached(done: Path) -> dict | None:
    """A cached stage's results, or None when the file is damaged (the entry is rebuilt)."""
    try:
        results = json.loads(done.read_text())
    except (OSError, ValueError) as err:
        log.warning("source cache: %s is unreadable (%s); training the source again", done, err)
        return None
    if not (done.parent / "checkpoints" / "last.ckpt").is_file():
        log.warning("source cache: %s has no checkpoints/last.ckpt; training the source again", done.parent)
        return None
    return results


def cached_source(cache_dir: Path, name: str, run_cfg: dict[str, Any], train: TrainFn) -> tuple[Path, dict, bool]:
    """The directory of the trained source (``checkpoints/last.ckpt``, ``results.json``), its
    results, and whether this call trained it. ``train(run_cfg, run_dir)`` trains into ``run_dir``.

    An entry without a readable ``results.json`` or checkpoint (a crash, a damaged disk) is rebuilt;
    temporaries that killed runs left behind are removed (only the lock holder trains, so any
    temporary found while holding the lock is stale)."""
    key = source_key(run_cfg)
    stem = f"{folder_name(name)}-{key}"
    final = cache_dir / stem
    done = final / "results.json"
    if done.is_file() and (results := read_cached(done)) is not None:
        return final, results, False
    writable = next(parent for parent in (cache_dir, *cache_dir.parents) if parent.exists())
    if not os.access(writable, os.W_OK):
        raise ConfigError(f"source.cache_dir='{cache_dir}' is not writable and holds no trained {name} "
                          f"({stem}); give a writable source.cache_dir, or train it once where one is")
    with exclusive_lock(cache_dir / f".{stem}.lock"):
        if done.is_file() and (results := read_cached(done)) is not None:  # another job finished it while we waited
            return final, results, False
        for stale in [*cache_dir.glob(f".{stem}.tmp-*"), *([final] if final.exists() else [])]:
            log.warning("source cache: removing %s (left by a run that did not finish)", stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging = cache_dir / f".{stem}.tmp-{os.getpid()}"
        staging.mkdir(parents=True)
        try:
            (staging / "source_config.json").write_text(json.dumps(run_cfg, indent=1, default=str))
            try:
                results = train(run_cfg, staging)
            except (TrainingDiverged, RunWithoutResult) as err:
                raise SourceFailed(f"source stage {run_name(run_cfg)}: {err}") from err
            results["run_dir"] = str(final)
            (staging / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            os.replace(staging, final)  # atomic: readers see no directory or a complete one
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed source leaves nothing behind
    return final, results, True


def source_weights(cfg: dict, train: TrainFn, stage_cfg: dict | None = None) -> tuple[str, dict | None]:
    """Initial weights of a transfer run (a checkpoint file or a torchvision enum name) and, for a
    source task, the source's results (trained now with ``train``, or reused from the cache).
    ``stage_cfg``: ``source_config(cfg)`` when the caller has it (``RunPlan.chain``)."""
    if cfg["source"]["task"]:
        stage_cfg = source_config(cfg) if stage_cfg is None else stage_cfg
        directory, results, trained = cached_source(
            Path(cfg["source"]["cache_dir"]), run_name(stage_cfg).replace(":", "-"), stage_cfg, train)
        log.info("source %s %s: %s", results["name"], "trained" if trained else "reused from cache", directory)
        # The last checkpoint, not the best one: the best is chosen on val images, which may be
        # the target's val images too (the paper's shared cat/dog split).
        return str(directory / "checkpoints" / "last.ckpt"), {**results, "cached": not trained}
    if cfg["source"]["weights"]:
        return cfg["source"]["weights"], None
    raise ConfigError("a transfer run needs source.task (e.g. +source.task.positive=cat) or source.weights "
                      "(e.g. source.weights=IMAGENET1K_V2)")
