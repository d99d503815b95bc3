"""Checks before Hydra starts a run or a sweep, and Hydra's own errors as one line.

- A run or sweep directory that already holds a run (``results.json`` or ``checkpoints/``) or a
  sweep (``multirun.yaml``) is refused before Hydra writes into it, and a new one is claimed
  atomically (``checkpoints/``, ``multirun.yaml``) before Hydra writes there: nothing overwrites
  another run's outputs, also when two start together. A resume from the directory's own checkpoint
  (``ckpt_path=<run dir>/checkpoints/last.ckpt``) continues that run there. (The default directories are new timestamps, down to
  the microsecond; this catches an explicit ``hydra.run.dir`` / ``hydra.sweep.dir`` given twice.)
- The same sweep command run again on its own ``hydra.sweep.dir`` continues that sweep: the jobs
  that finished are kept, the others run (``simfreeze.runs.resume.earlier_attempt``); one process
  at a time holds a sweep directory (a lock on its ``multirun.yaml``).
- A resume of a run that finished (``finished_run``: a requeued job) says so and exits with status
  0 before Hydra writes anything.
- Every job of a sweep is composed and checked (``simfreeze.config.validate_config``) before the
  first job starts, so a bad key in job 30 does not fail it after 29 jobs of training.
- ``hydra_error_line`` turns Hydra's multi-line composition errors (unknown group option, unknown
  key, override syntax) into the same one-line form as ours.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from hydra.errors import CompactHydraException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from simfreeze.config import check_writable_folder, did_you_mean, validate_config
from simfreeze.errors import ConfigError, RunDirInUse, UserError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def used_run_dir(run_dir: Path) -> str | None:
    """What in ``run_dir`` shows that a run or a sweep already lives there (``a run (results.json)``),
    or None."""
    for name, what in (("results.json", "a run"), ("checkpoints", "a run"), ("multirun.yaml", "a sweep")):
        if (run_dir / name).exists():
            return f"{what} ({name})"
    return None


def resumes_in_place(run_dir: Path, ckpt_path: str | None) -> bool:
    """A resume from this directory's own checkpoint continues that run; it may write there."""
    return bool(ckpt_path) and Path(ckpt_path).expanduser().resolve().is_relative_to(run_dir.resolve())


def refuse_used_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    found = used_run_dir(run_dir)
    if found and not resumes_in_place(run_dir, ckpt_path):
        last = run_dir / "checkpoints" / "last.ckpt"
        hint = (f"or resume that run with ckpt_path={last}" if last.is_file() else
                "that run left no checkpoint to resume from")
        raise RunDirInUse(f"hydra.run.dir='{run_dir}' already holds {found}; give a new directory "
                          f"(the default is a new timestamp); {hint}")


def epochs_done(checkpoint: dict) -> int:
    """The epochs a checkpoint's fit has finished (Lightning counts one as processed before the
    checkpoint written at its end)."""
    progress = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", 0))


def finished_run(ckpt_path: str | None, max_epochs: int) -> Path | None:
    """The run directory of ``ckpt_path`` (``<run dir>/checkpoints/<file>``) when that run has
    finished: its ``results.json`` says ``ok`` and the checkpoint is its last epoch's end. Resuming
    it would train nothing and overwrite its results."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser()
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints":
        return None
    try:
        status = json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    if status != "ok":
        return None
    from simfreeze.networks.build import load_checkpoint

    return run_dir if epochs_done(load_checkpoint(path, "ckpt_path", mmap=True)) >= max_epochs else None


# Run directories this process claimed before Hydra wrote to them (Preflight): the fit finds its own claim.
CLAIMED: set[Path] = set()


def claim_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """Atomically take ``run_dir`` for this run: of two runs started on one directory, one fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / "checkpoints").mkdir()
    except FileExistsError:
        refuse_used_run_dir(run_dir, ckpt_path)


def claim_own_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """``claim_run_dir`` unless this process claimed ``run_dir`` already (``python -m train`` does,
    before Hydra writes ``.hydra/`` and ``train.log`` there)."""
    if run_dir.resolve() not in CLAIMED:
        claim_run_dir(run_dir, ckpt_path)


# What a run writes before its training starts: a refusal found by then leaves nothing behind.
BEFORE_TRAINING = {".hydra", "train.log", "split.json", "plan.json", "similarity.json", "checkpoints", "tensorboard", "csv",
                   "wandb"}


def discard_refused_run(run_dir: Path, ckpt_path: str | None) -> bool:
    """Remove the directory of a run refused before it trained (Hydra made it, with ``.hydra/`` and
    ``train.log``, before the checks that need the data or the network could run). Kept when it holds
    anything else, a checkpoint, or the run resumed in it. Returns whether it was removed."""
    import shutil

    if not run_dir.is_dir() or resumes_in_place(run_dir, ckpt_path):
        return False
    entries = {entry.name for entry in run_dir.iterdir()}
    checkpoints = run_dir / "checkpoints"
    if entries - BEFORE_TRAINING or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def refuse_used_sweep_dir(sweep_dir: Path) -> None:
    found = used_run_dir(sweep_dir)
    if found:
        again = ("; to finish that sweep, run its own command again" if found.startswith("a sweep") else "")
        raise RunDirInUse(f"hydra.sweep.dir='{sweep_dir}' already holds {found}; give a new "
                          f"directory (the default is a new timestamp){again}")


def recorded_sweep(sweep_dir: Path):
    """The sweep ``sweep_dir/multirun.yaml`` records (Hydra's whole config), {} for the empty file a
    claim left before Hydra wrote it, or None when there is no such file or it cannot be read."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    try:
        if path.stat().st_size == 0:
            return {}
        return OmegaConf.load(path)
    except Exception:  # absent, unreadable, not YAML: not a sweep this command can continue
        return None


def continues_sweep(sweep_dir: Path, config: DictConfig) -> bool:
    """Whether this sweep is the one ``sweep_dir`` holds, run again with its own command (the same
    overrides and sweeper params): it then continues there (``simfreeze.runs.resume.earlier_attempt``)."""
    from omegaconf import OmegaConf

    recorded = recorded_sweep(sweep_dir)
    if recorded is None:
        return False
    if isinstance(recorded, dict):  # an empty file: claimed, never started; nothing of another sweep is there
        return True
    if OmegaConf.select(recorded, "hydra.overrides.task") is None:
        return False  # not Hydra's record of a sweep

    def params(config) -> dict:
        node = config.hydra.sweeper.get("params")
        return {} if node is None else OmegaConf.to_container(node)
    return list(recorded.hydra.overrides.task) == list(config.hydra.overrides.task) and params(recorded) == params(config)


# The sweep directory this process holds (an open, locked multirun.yaml): a second process that tries to
# continue the same sweep while this one runs is refused.
HELD_SWEEP: list = []


def hold_sweep_dir(sweep_dir: Path) -> None:
    import fcntl

    handle = open(sweep_dir / "multirun.yaml", "a")  # noqa: SIM115 (held for the sweep's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunDirInUse(f"hydra.sweep.dir='{sweep_dir}': the sweep is running in another process; wait for it "
                          f"to end, then run its command again to finish what it left") from None
    HELD_SWEEP.append(handle)


def claim_sweep_dir(sweep_dir: Path) -> None:
    """Atomically take ``sweep_dir``: its ``multirun.yaml`` made here, empty (Hydra's sweeper writes it
    when it starts), so that of two sweeps started on one directory the second is refused."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        (sweep_dir / "multirun.yaml").open("x").close()
    except FileExistsError:
        raise RunDirInUse(f"hydra.sweep.dir='{sweep_dir}' already holds a sweep (multirun.yaml), started just now by "
                          f"another process; give a new directory (the default is a new timestamp)") from None


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of a basic-sweeper multirun, as the sweeper will expand them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def validate_sweep(config: DictConfig) -> None:
    """Compose every job's config, then check each; the first bad one fails, naming its overrides."""
    from hydra.core.global_hydra import GlobalHydra

    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return  # other sweepers (Optuna, Ax) choose their values while they run
    loader = GlobalHydra.instance().config_loader()
    jobs = sweep_jobs(config)
    refuse_repeated_jobs(jobs)
    if len(jobs) > CHECK_EVERY_JOB_UP_TO:  # composing takes ~0.1 s a job: the full study's 1,944 would take minutes
        jobs = covering_jobs(jobs)
        logging.getLogger("hydra").info("preflight: checked %d of the sweep's jobs, which hold every value of every axis; each job is "
                                        "checked again as it starts", len(jobs))
    composed = [(job, loader.load_sweep_config(config, list(job))) for job in jobs]
    for job, job_cfg in composed:
        try:
            validate_config(without_hydra(job_cfg))
        except ConfigError as err:
            raise ConfigError(f"{err} (in the sweep's job {' '.join(job)})") from err


CHECK_EVERY_JOB_UP_TO = 300


def covering_jobs(jobs: list[list[str]]) -> list[list[str]]:
    """The jobs, in order, that hold an override no earlier kept job holds: every value of every
    axis is in one of them (at most the sum of the axes' lengths, not their product)."""
    seen: set[str] = set()
    kept = []
    for job in jobs:
        if not seen.issuperset(job):
            kept.append(job)
            seen.update(job)
    return kept


def refuse_repeated_jobs(jobs: list[list[str]]) -> None:
    """Two jobs with the same overrides are one run twice (``seed=0,0``): the summary would count
    them as two seeds that agree."""
    first: dict[tuple[str, ...], int] = {}
    for number, job in enumerate(jobs):
        key = tuple(sorted(job))
        if key in first:
            raise ConfigError(f"the sweep's jobs {first[key]} and {number} are the same run ({' '.join(job)}); "
                              f"give each value once (e.g. seed=0,1)")
        first[key] = number


def without_hydra(config: DictConfig) -> DictConfig:
    """The job's own config: ``config`` less Hydra's node (a copy)."""
    job = config.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def is_launched_rank() -> bool:
    """A process that Lightning started for DDP rank > 0: it shares rank 0's run directory."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def exit_with(message: str) -> None:
    # Hydra turns a callback's exception into a warning and goes on; SystemExit gets through.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Preflight(Callback):
    """Hydra callback (``hydra.callbacks.preflight`` in conf/train.yaml): the checks above."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if is_launched_rank():
            return
        run_dir = Path(config.hydra.run.dir)
        try:
            refuse_used_run_dir(run_dir, config.get("ckpt_path"))
            check_writable_folder("hydra.run.dir", config.hydra.run.dir)
            validate_config(without_hydra(config))  # before Hydra makes the run directory: a refusal writes nothing
            finished = finished_run(config.get("ckpt_path"), config.trainer.max_epochs)
            if not finished:
                # Claimed before Hydra writes .hydra/ and train.log there: a second run on this directory,
                # started while this one imports, is refused before it writes anything.
                claim_run_dir(run_dir, config.get("ckpt_path"))
                CLAIMED.add(run_dir.resolve())
        except UserError as err:
            exit_with(str(err))
        except Exception as err:  # Hydra would turn it into a warning and start the run unchecked
            exit_with(f"the run's checks failed ({type(err).__name__}: {err}); nothing was run")
        if finished:  # a requeued job: nothing to do, and no failure for its scheduler
            print(f"simfreeze: {finished} already finished (results.json); nothing to do — start a new run "
                  f"without ckpt_path to train again")
            sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            # The same command again on its sweep directory finishes the sweep: jobs that finished are kept
            # (simfreeze.runs.resume.earlier_attempt); any other sweep or run there is refused.
            again = (sweep_dir / "multirun.yaml").is_file() and continues_sweep(sweep_dir, config)
            if not again:
                refuse_used_sweep_dir(sweep_dir)
            check_writable_folder("hydra.sweep.dir", config.hydra.sweep.dir)
            validate_sweep(config)
            if not again:
                claim_sweep_dir(sweep_dir)  # after the checks: a refused sweep writes nothing
            hold_sweep_dir(sweep_dir)
        except UserError as err:
            exit_with(str(err))
        except CompactHydraException as err:  # a job's overrides do not compose
            exit_with(hydra_error_line(err))
        except Exception as err:  # Hydra would turn it into a warning and start the sweep unchecked
            exit_with(f"the sweep's checks failed ({type(err).__name__}: {err}); nothing was run")
        if again:
            print(f"continuing the sweep in {sweep_dir}: jobs that finished are kept, the rest run "
                  f"(a stopped job resumes from its last.ckpt)", flush=True)


# Hydra plugins the project's extras install: a config that needs one names the extra.
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": " (the Optuna sweeper: .venv/bin/pip install -e '.[optuna]')"}


def config_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config (Hydra's own node left out), without resolving interpolations."""
    keys = []
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            keys.extend(config_keys(child, f"{full}."))
    return keys


def hydra_error_line(err: Exception) -> str:
    """One line for an error Hydra raises while composing the config."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        hint = PLUGIN_EXTRAS.get(err.missing_cfg_file, "")
        close = did_you_mean(option, err.options) if not hint else ""
        return f"{group}={option}: no such option{close}; {group} is one of {', '.join(err.options)}{hint}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
        key = getattr(cause, "full_key", None) or "?"
        parent = getattr(cause, "parent_node", None)
        close = did_you_mean(key, config_keys(parent._get_root())) if isinstance(parent, DictConfig) else ""
        return f"unknown key {key}: the config has no such key{close} (python -m train --cfg job prints every key)"
    lines = []
    for line in str(err).splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)
