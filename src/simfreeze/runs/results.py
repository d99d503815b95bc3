"""What a run leaves behind: its clock, ``results.json`` and the one-line summary."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from simfreeze.config import computation_digest, settings_digest
from simfreeze.method.plan import FreezeSpec
from simfreeze.speed.precision import native_cpu_bf16

progress = logging.getLogger("simfreeze.progress")  # the console and train.log (simfreeze.runs.progress)


class FitClock(L.Callback):
    """Wall time of the fit (from setup, so including a similarity pass), of each epoch, and of the
    training part of each epoch, and the images trained.

    A resumed run continues the clock of the checkpoint's run (``state_dict``): ``fit_seconds`` is
    the sum of each part's fit time up to its checkpoint and the resumed part's; work a killed part
    did after its last checkpoint is trained again and counted once. An epoch that a stop cut and a
    resume finished counts as one epoch, its time the sum of both pieces, so ``mean_epoch_seconds``
    and ``train_images_per_second`` are over the epochs as trained.

    CUDA work is asynchronous, so the clock synchronises the device before every reading.
    """

    def __init__(self):
        self.fit_seconds = 0.0
        self.epoch_seconds: list[float] = []
        self.train_seconds: list[float] = []
        self.train_images = 0
        self._fit_start = self._epoch_start = 0.0
        self._train_end: float | None = None
        self._before = 0.0                   # fit seconds of the parts before a resume
        self._in_epoch = False
        self._resumed_in_epoch: float | None = None  # seconds of the cut epoch the checkpoint's part trained

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def setup(self, trainer, pl_module, stage):
        # Listed first, so the fit time includes the other callbacks' setup work (the similarity pass).
        if stage == "fit":
            self._fit_start = self._now(pl_module)

    def on_train_start(self, trainer, pl_module):
        # Resumed within an epoch, Lightning calls no on_train_epoch_start: the epoch goes on from here.
        if self._resumed_in_epoch is not None:
            self._epoch_start, self._train_end = self._now(pl_module) - self._resumed_in_epoch, None
            self._in_epoch, self._resumed_in_epoch = True, None

    def on_fit_end(self, trainer, pl_module):
        self.fit_seconds = self._before + self._now(pl_module) - self._fit_start

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = self._now(pl_module)
        self._train_end = None
        self._in_epoch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_images += len(batch[1]) * trainer.world_size  # every DDP process trains a batch as large

    def on_validation_start(self, trainer, pl_module):
        if trainer.training and self._train_end is None:  # the epoch-end validation, not sanity checking
            self._train_end = self._now(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        end = self._now(pl_module)
        self.epoch_seconds.append(end - self._epoch_start)
        self.train_seconds.append((self._train_end or end) - self._epoch_start)
        self._in_epoch = False

    def state_dict(self) -> dict:
        now = time.perf_counter()  # a checkpoint is written after the device's work is done
        return {"fit_seconds": self._before + now - self._fit_start, "epoch_seconds": list(self.epoch_seconds),
                "train_seconds": list(self.train_seconds), "train_images": self.train_images,
                "in_epoch_seconds": now - self._epoch_start if self._in_epoch else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = state_dict["fit_seconds"]
        self.epoch_seconds, self.train_seconds = list(state_dict["epoch_seconds"]), list(state_dict["train_seconds"])
        self.train_images, self._resumed_in_epoch = state_dict["train_images"], state_dict["in_epoch_seconds"]

    def summary(self) -> dict[str, float | None]:
        train_time = sum(self.train_seconds)
        return {
            "fit_seconds": round(self.fit_seconds, 3),
            "mean_epoch_seconds": round(sum(self.epoch_seconds) / len(self.epoch_seconds), 3)
            if self.epoch_seconds else None,
            "train_images_per_second": round(self.train_images / train_time, 1) if train_time else None,
        }


def library_versions() -> dict[str, str]:
    import hydra
    import lightning
    import torchmetrics
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning": lightning.__version__,
            "hydra": hydra.__version__, "torchmetrics": torchmetrics.__version__}


def git_revision() -> str | None:
    """The project's commit, with ``-dirty`` when the working tree has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def device_name(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    bf16 = "native bf16" if native_cpu_bf16() else "no native bf16"
    return f"{device} ({cpu_name()}, {torch.get_num_threads()} threads, {bf16})"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux): times differ a lot between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reproducibility(device_type: str, deterministic: bool) -> str:
    """What a rerun with the same config and seed promises on this device (docs/outputs.md, "What a run leaves")."""
    if device_type == "cpu":
        return ("bit-identical: the same config and seed give the same weights and metrics on this CPU, in fp32 "
                "and bf16 autocast, also after a resume (tests/test_reproducibility.py)")
    if deterministic:
        return "bit-identical on this GPU model and software stack (trainer.deterministic=true)"
    return ("within float noise: cuDNN may pick non-deterministic kernels; set trainer.deterministic=true "
            "for bit-identical reruns")


def run_name(cfg: dict) -> str:
    """The run's label in summaries: ``name``, or ``<arm>:<positive class or class list>``."""
    data = cfg["data"]
    return cfg["name"] or f"{cfg['arm']}:{data['positive'] or '-'.join(data['classes'])}"


def run_results(cfg: dict, run_dir: Path, trainer: L.Trainer, *parts: dict, overrides: list[str] = (),
                policy: str | None = None) -> dict[str, Any]:
    """Everything ``results.json`` records about one run: what the config and the trainer say, then
    what each part of the run recorded (metrics, clock, network, transfer, source), in that order.
    ``policy``: the freeze policy that ran (the run plan's; else parsed from ``cfg``)."""
    results = {
        "status": "ok", "name": run_name(cfg), "arm": cfg["arm"], "run_dir": str(run_dir), "overrides": list(overrides),
        "epochs": trainer.current_epoch, "steps": trainer.global_step, "transfer": cfg["transfer"],
        # what ran: the l_freeze shorthand sets it
        "policy": policy if policy is not None else FreezeSpec.from_config(cfg["freeze"]).policy,
        "seed": cfg["seed"], "split_seed": cfg["data"]["seed"], "precision": str(trainer.precision),
        # the study's axes besides depth and seed: a learning rate chosen per setting, the target's data size
        "lr": cfg["optimizer"].get("lr"), "train_per_class": cfg["data"].get("train_per_class"),
        "reproducibility": reproducibility(trainer.strategy.root_device.type, bool(cfg["trainer"].get("deterministic"))),
        "device": device_name(trainer), "world_size": trainer.world_size,
        "settings_digest": settings_digest(cfg),  # what it computed: a sweep run again keeps it when the same
        "computation_digest": computation_digest(cfg),  # the same, less sources it does not use: a sweep's twin jobs
    }
    for part in parts:
        results.update(part)
    return {**results, "versions": library_versions(), "git_revision": git_revision(), "command": " ".join(sys.argv)}


def source_record(source: dict | None) -> dict:
    """The source's results as a run records them; a chain's stages nest under ``source``."""
    return {"source": None if source is None else {k: source.get(k) for k in (
        "name", "run_dir", "best_val_acc", "test_acc", "fit_seconds", "l_freeze", "images", "cached", "source")}}


def metric(value) -> float | None:
    return None if value is None else round(float(value), 6)


def failed_results(cfg: dict, run_dir: Path, error: BaseException, overrides: list[str]) -> dict[str, Any]:
    """What ``results.json`` records for a sweep job that failed: enough for the summary to list it."""
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "name": run_name(cfg), "arm": cfg.get("arm"),
            "seed": cfg.get("seed"), "run_dir": str(run_dir), "overrides": overrides,
            "git_revision": git_revision(), "command": " ".join(sys.argv)}


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def finish(run_dir: Path, results: dict[str, Any], line: Callable[[dict], str] | None = None,
           write: bool = True, show: bool = True) -> dict[str, Any]:
    """Write ``results.json`` and print the run's one line (``write`` False: another DDP process does;
    ``show`` False: the line is printed already)."""
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_results(run_dir / "results.json", results)
        if show:
            progress.info("%s", (line or summary_line)({**results, "run_dir": str(final_dir(run_dir))}))
            if line is None:
                logging.getLogger("simfreeze").info("%s", details_line(results))  # train.log only
    return results


def final_dir(run_dir: Path) -> Path:
    """Where a run's files end up: a source stage trains in ``.<name>.tmp-<pid>`` and is renamed to
    ``<name>`` when it is done (``simfreeze.runs.sources.cached_source``)."""
    name = run_dir.name
    if name.startswith(".") and ".tmp-" in name:
        return run_dir.with_name(name[1:].rsplit(".tmp-", 1)[0])
    return run_dir


def summary_line(results: dict[str, Any]) -> str:
    """The run's one console line, under 160 columns but for a long run directory: what it scored and where it
    is; img/s, the final val/acc and the parameter total are in ``details_line`` (train.log) and results.json."""
    frozen = f"L_freeze={results['l_freeze']} " if results.get("n_layers") else ""
    score = f"S={results['S']:.4f} " if results.get("S") is not None else ""
    test = f" test/acc={results['test_acc']:.4f}" if results.get("test_acc") is not None else ""
    best = "n/a" if results.get("best_val_acc") is None else f"{results['best_val_acc']:.4f}"
    return (f"[simfreeze] {results['name']}: {score}{frozen}val/acc={best}{test} fit={results['fit_seconds']:.1f}s "
            f"trainable={millions(results['trainable_parameters'])} seed={results['seed']} → {results['run_dir']}")


def millions(count: int) -> str:
    """23.51M; a count under 100,000 (a linear head's 4,098) as itself, not as 0.00M."""
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count:,}"


def details_line(results: dict[str, Any]) -> str:
    """What the console line leaves out, for train.log."""
    def pct(value):
        return "n/a" if value is None else f"{value:.4f}"

    test = ("" if results.get("test_acc") is not None else
            " (no test: test=false, or the data have no held-out images: data.holdout_per_class or a test/ folder adds them)")
    return (f"{results['name']}: best val/acc={pct(results['best_val_acc'])} final val/acc={pct(results['final_val_acc'])} "
            f"test/acc={pct(results['test_acc'])}{test} {results['train_images_per_second']} img/s "
            f"trainable={results['trainable_parameters']:,}/{results['total_parameters']:,}")
