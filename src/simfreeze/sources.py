"""Source models trained by the framework: keyed by everything that determines them, trained once.

A source *task* (e.g. the paper's cat model) is trained with the target's recipe into
``<cache_dir>/<name>-<key>/``. The key hashes the source run's resolved config (data, model,
optimizer, scheduler, trainer, seed) minus keys that cannot change the weights. Training happens
in a temporary directory under an exclusive file lock and is renamed into place when complete, so
parallel jobs that need the same source train it once and never read a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

# Keys of a run config that do not change the trained weights (a source run from scratch never
# freezes, never computes similarity and never transfers; a stage of a chain does, see source_key).
NOT_IN_KEY = {"name", "progress", "test", "ckpt_path", "arm", "cache", "similarity", "freeze", "transfer",
              "source_only"}
# devices / num_nodes / strategy: a source always trains on one device (train.source_run_config).
TRAINER_NOT_IN_KEY = {"log_every_n_steps", "enable_progress_bar", "enable_model_summary", "devices",
                      "accelerator", "num_sanity_val_steps", "num_nodes", "strategy"}


def source_key(run_cfg: dict[str, Any]) -> str:
    """A short stable hash of the parts of a resolved run config that determine the weights."""
    relevant = {k: v for k, v in run_cfg.items() if k not in NOT_IN_KEY}
    if run_cfg.get("transfer"):  # a stage of a chain: it trains from its own source with a freeze plan
        relevant.update(transfer=True, freeze=run_cfg["freeze"])
    relevant["trainer"] = {k: v for k, v in run_cfg.get("trainer", {}).items() if k not in TRAINER_NOT_IN_KEY}
    relevant["data"] = {k: v for k, v in run_cfg.get("data", {}).items() if k not in ("eval_batch_size", "use_test")}
    relevant["source"] = {k: v for k, v in run_cfg.get("source", {}).items() if k != "cache_dir"}
    # How the network runs, not what it learns (up to float rounding).
    relevant["model"] = {k: v for k, v in run_cfg.get("model", {}).items() if k not in ("compile", "channels_last")}
    if relevant["data"].get("root"):
        relevant["data"]["root"] = str(Path(relevant["data"]["root"]).expanduser().resolve())
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def exclusive_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_source(cache_dir: Path, name: str, run_cfg: dict[str, Any],
                  train: Callable[[dict[str, Any], Path], dict]) -> tuple[Path, dict, bool]:
    """The directory of the trained source (``checkpoints/last.ckpt``, ``results.json``), its
    results, and whether this call trained it. ``train(run_cfg, run_dir)`` trains into ``run_dir``."""
    key = source_key(run_cfg)
    final = cache_dir / f"{name}-{key}"
    done = final / "results.json"
    if done.is_file():
        return final, json.loads(done.read_text()), False
    with exclusive_lock(cache_dir / f".{name}-{key}.lock"):
        if done.is_file():  # another job finished it while we waited
            return final, json.loads(done.read_text()), False
        staging = cache_dir / f".{name}-{key}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "source_config.json").write_text(json.dumps(run_cfg, indent=1, default=str))
        results = train(run_cfg, staging)
        results["run_dir"] = str(final)
        (staging / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(staging, final)  # atomic: readers see no directory or a complete one
    return final, results, True
