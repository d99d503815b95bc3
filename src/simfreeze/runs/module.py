"""The LightningModule: cross-entropy training of a network, or of the units after a cached
frozen prefix (``suffix``), with accuracy metrics; its checkpoints leave the frozen prefix out."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning as L
import torch
import torchmetrics
from torch import nn

from simfreeze.errors import TrainingDiverged
from simfreeze.method.freeze import frozen_state_from, frozen_state_keys, leave_out_frozen
from simfreeze.networks.build import FROZEN_STATE
from simfreeze.networks.units import Unit, run_units


class Classifier(L.LightningModule):
    """Cross-entropy training of ``net`` with accuracy metrics; optimizer over trainable params only.

    No recipe defaults here: the optimizer, schedule and the rest come from the config (conf/).
    ``scheduler`` steps every batch (OneCycleLR). Checkpoints leave out the frozen state (weights,
    and statistics of frozen BatchNorm) unless ``keep_frozen``; a restore takes it back from ``net``,
    which the run rebuilt from the same source (``simfreeze.method.freeze``, "frozen state").
    """

    def __init__(self, net: nn.Module, num_classes: int, *, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None, label_smoothing: float, channels_last: bool,
                 keep_frozen: bool = False):
        super().__init__()
        self.keep_frozen = keep_frozen
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # validate_args=False: no checks of the inputs at each update (host work; their count of unique
        # labels would wait for a GPU — torchmetrics 1.9 skips it for float logits, a later one may not).
        # Updated, not called: a call also computes the batch's accuracy, shown only by an on_step log.
        metric = partial(torchmetrics.classification.MulticlassAccuracy, num_classes=num_classes, average="micro",
                         validate_args=False)
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()
        # Set when batches are cached prefix outputs: the net's remaining units, run in order.
        # A plain list, so the modules stay registered once (under net) in the state dict.
        self.suffix: list[Unit] | None = None
        self._finite: torch.Tensor | None = None  # every training loss of this epoch finite (on the device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x) if self.suffix is None else run_units(self.suffix, x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        # Kept on the device and read once per epoch: a check per step would wait for every step on a GPU.
        finite = loss.detach().isfinite()
        self._finite = finite if self._finite is None else self._finite & finite
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self):
        if self.trainer.training:  # the epoch-end validation: before it, so no checkpoint keeps diverged weights
            self._stop_if_diverged()

    def on_train_epoch_end(self):
        self._stop_if_diverged()

    def _stop_if_diverged(self):
        if self._finite is not None and not bool(self._finite):
            raise TrainingDiverged(f"training diverged: the loss became NaN or infinite in epoch {self.current_epoch + 1} "
                                   f"(a learning rate too high? optimizer.lr); the run is failed, not reported")
        self._finite = None

    def _evaluate(self, batch, stage: str, metric):
        x, y = batch
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), prog_bar=True, sync_dist=True)  # mean over DDP processes
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = [] if self.keep_frozen else [k for k in frozen_state_keys(self) if k in checkpoint["state_dict"]]
        if keys:
            checkpoint[FROZEN_STATE] = leave_out_frozen(checkpoint["state_dict"], keys)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        record = checkpoint.get(FROZEN_STATE)
        if record:  # before Lightning loads the state dict (strictly): put the left-out tensors back
            path = self._trainer.ckpt_path if self._trainer is not None else None
            source = f"the checkpoint '{path}'" if path else "the checkpoint"
            checkpoint["state_dict"].update(frozen_state_from(record, self.state_dict(), source))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler_kwargs = {}
        if wants_total_steps(self.scheduler_factory):
            # OneCycleLR divides by its phase lengths: tiny runs (< 10 steps) get a stretched schedule.
            scheduler_kwargs["total_steps"] = max(int(self.trainer.estimated_stepping_batches), 10)
        scheduler = self.scheduler_factory(optimizer, **scheduler_kwargs)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def wants_total_steps(factory) -> bool:
    """OneCycleLR-style schedulers need the run's step count, which only the Trainer knows."""
    import inspect

    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {})
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "total_steps" in params and keywords.get("total_steps") is None
