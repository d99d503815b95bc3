"""The console: progress that reads well in a log file (one line per epoch instead of a redrawn
bar), and Lightning's messages routed through Hydra's log handlers.

Progress and result lines go to the ``simfreeze.progress`` logger, so they reach ``train.log`` too.
Hydra's console handler (conf/train.yaml, ``hydra.job_logging``) shows those, warnings and errors;
everything else (Lightning's device lines and tips, our set-up details) goes to ``train.log`` only,
unless ``verbose=true``."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

console = logging.getLogger("simfreeze.progress")  # epoch and result lines: the console and train.log


class ConsoleFilter(logging.Filter):
    """Hydra's console handler lets through progress, results, warnings and errors; the rest is in
    ``train.log``. ``verbose`` (the ``verbose`` setting) lets everything through."""

    verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # written for train.log only (e.g. a traceback printed as one line)
            return False
        return ConsoleFilter.verbose or record.levelno >= logging.WARNING or record.name == console.name


class ConsoleHandler(logging.StreamHandler):
    """Hydra's console handler (conf/train.yaml), quiet once the console is gone: a reader that
    closed the pipe (``python -m train … | head``) would otherwise get a logging traceback for every
    later line. The console is then pointed at the null device (so ``print`` and the interpreter's
    last flush find it writable too) and the run goes on; ``train.log`` keeps every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError)) or (
                isinstance(error, (OSError, ValueError)) and getattr(self.stream, "closed", False)):
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError):  # no file descriptor to redirect: drop the console alone
                self.setStream(open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the process)
            return
        super().handleError(record)


class EpochLines(ProgressBar):
    """Prints ``epoch 2/3  train/loss 0.61  val/loss 0.58  val/acc 0.702  (12.4 s)`` per epoch, and
    within a long epoch a line every ``every_s`` seconds (``epoch 1/4  batch 120/400  train/loss
    1.23  (30.2 s)``), so a log never stays silent for minutes."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self._enabled = True
        self._start = self._shown = 0.0
        self.every_s = every_s

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = self._shown = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if not self._enabled or now - self._shown < self.every_s:
            return
        self._shown = now
        loss = trainer.callback_metrics.get("train/loss")
        shown = f"  train/loss {float(loss):.4f}" if loss is not None else ""
        console.info("epoch %d/%d  batch %d/%d%s  (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs,
                     batch_idx + 1, trainer.num_training_batches, shown, now - self._start)

    def on_train_epoch_end(self, trainer, pl_module):
        if not self._enabled:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith(("train/loss", "val/"))}
        shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()))
        console.info("epoch %d/%d  %s  (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs, shown,
                     time.perf_counter() - self._start)

    def on_test_end(self, trainer, pl_module):
        if self._enabled:
            shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                              if k.startswith("test/"))
            # train.log only: the result line that follows has test/acc
            logging.getLogger("simfreeze").info("test  %s", shown)


class Bar(TQDMProgressBar):
    """Lightning's tqdm bar, whose postfix (``train/loss``) is read at most every ``postfix_every_s``
    seconds within an epoch, and at its end: reading it turns the logged loss into a float, which
    on a GPU waits for the step to finish, so a read per step would keep the host from running
    ahead. The count still moves every step."""

    def __init__(self, postfix_every_s: float = 1.0):
        super().__init__()
        self.postfix_every_s = postfix_every_s
        self._postfix_at = float("-inf")

    def on_train_epoch_start(self, trainer, *_):
        # Lightning's, but counted from 1 out of max_epochs as the epoch lines count ("Epoch 0" otherwise).
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is None or not self._should_update(n, bar.total):
            return
        now = time.perf_counter()
        if n == bar.total or now - self._postfix_at >= self.postfix_every_s:
            self._postfix_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif not bar.disable:
            bar.n = n
            bar.refresh()


def progress_bar(style: str = "auto") -> ProgressBar:
    """``bar`` (tqdm), ``lines`` (one line per epoch), or ``auto``: a bar only on a terminal."""
    if style not in ("auto", "bar", "lines"):
        raise ValueError(f"progress='{style}' must be one of auto, bar, lines")
    if style == "bar" or (style == "auto" and sys.stderr.isatty()):
        return Bar()
    return EpochLines()


def quiet_lightning(verbose: bool = False) -> None:
    """Route Lightning's messages through Hydra's log handlers only (console + train.log); without
    ``verbose`` the console shows progress, results and warnings only (``ConsoleFilter``)."""
    import lightning  # noqa: F401  (its import installs the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    ConsoleFilter.verbose = verbose
    if not logging.getLogger().handlers and not console.handlers:  # no Hydra (the bench): the lines still print
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        console.addHandler(handler)
        console.setLevel(logging.INFO)
        console.propagate = False
    if not verbose:  # a tiny run's advice, not a problem
        warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # Frozen BatchNorm is held in eval on purpose (simfreeze.runs.transfer).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A resume in place writes into its own checkpoints/ on purpose (another run there is refused first).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
