"""The LightningModule: cross-entropy training of a network, or of the units after a cached
frozen prefix (``suffix``), with accuracy metrics; its checkpoints leave the frozen prefix out."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from simfreeze.config import wants_total_steps
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
        self._finite: torch.Tensor | None = None  # every training loss since the last check finite (on the device)
        self._val_finite: torch.Tensor | None = None  # every validation loss of this validation finite
        self.validated = False  # a validation in this fit ran to its end (simfreeze.runs.fit.check_fit_result)
        self.test_predictions: list[torch.Tensor] = []  # per test batch, the predicted labels

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

    def _fit_validation(self) -> bool:
        # A validation of the fit, not its sanity check; Lightning's stage is VALIDATING in both
        # (trainer.training is False then: a check on it never ran).
        return self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking

    def on_validation_epoch_start(self):
        self._val_finite = None  # not a sanity check's
        if self._fit_validation():  # before it, so no checkpoint keeps diverged weights
            self._stop_if_diverged()

    def on_validation_epoch_end(self):
        # Before ModelCheckpoint saves best.ckpt (on_validation_end or on_train_epoch_end): not of
        # weights that give a NaN loss.
        if self._fit_validation() and self._val_finite is not None:
            finite, self._val_finite = self._agreed(self._val_finite), None
            if not finite:
                raise TrainingDiverged(f"training diverged: the validation loss became NaN or infinite after epoch "
                                       f"{self.current_epoch + 1} (a learning rate too high? optimizer.lr); the run "
                                       f"is failed, not reported")
            self.validated = True

    def on_train_epoch_end(self):
        self._stop_if_diverged()

    def _stop_if_diverged(self):
        """Every training loss since the last check finite, and the weights after the last step too: a
        step whose loss was finite can still make them NaN (its update overflowed). One read of the
        device per check, i.e. per epoch, never per step."""
        if self._finite is None:
            return  # no step since the last check: nothing changed
        losses, self._finite = self._finite, None
        if self._agreed(losses & finite_state(self.net)):
            return
        epoch = self.current_epoch + 1
        if not self._agreed(losses):
            raise TrainingDiverged(f"training diverged: the loss became NaN or infinite in epoch {epoch} "
                                   f"(a learning rate too high? optimizer.lr); the run is failed, not reported")
        raise TrainingDiverged(f"training diverged: the weights became NaN or infinite after the last step of epoch "
                               f"{epoch}, whose loss was finite (a learning rate too high? optimizer.lr); the run is "
                               f"failed, not reported")

    def _agreed(self, flag: torch.Tensor) -> bool:
        # With DDP every process decides alike, or the others would wait for this one's collectives.
        return self.trainer.strategy.reduce_boolean_decision(bool(flag), all=True)

    def _evaluate(self, batch, stage: str, metric) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        metric.update(logits, y)
        loss = self.loss(logits, y)
        if stage == "val":  # on the device, read once per validation (on_validation_epoch_end)
            finite = loss.detach().isfinite()
            self._val_finite = finite if self._val_finite is None else self._val_finite & finite
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)  # mean over DDP processes
        self.log(f"{stage}/acc", metric, prog_bar=True)
        return logits

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def on_test_epoch_start(self):
        self.test_predictions = []

    def test_step(self, batch, batch_idx):
        # Each held-out image's predicted label, kept on the device and read once after the test: the
        # reports pair two settings image by image (test_predictions.json).
        self.test_predictions.append(self._evaluate(batch, "test", self.test_acc).argmax(dim=-1).detach())

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


def finite_state(net: nn.Module) -> torch.Tensor:
    """Whether every weight a step can change is finite: the trainable parameters and the BatchNorm
    statistics. A 0-d bool tensor on their device (no wait for it here)."""
    tensors = [p for p in net.parameters() if p.requires_grad]
    tensors += [b for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var) if b is not None]
    if not tensors:
        return torch.tensor(True)
    return torch.stack([t.detach().isfinite().all() for t in tensors]).all()
