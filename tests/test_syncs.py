"""Host–device syncs per training step (docs/performance.md).

On a GPU a ResNet-50 step (batch 32, 64×64) is 3–4 ms of device work. A call that makes the host
wait for the device (a sync) stops it from queueing the next step while this one runs, so each
sync per step costs throughput. A CPU never waits, so the first test counts, during real training
steps, the calls that would wait on CUDA; the GPU-marked test makes CUDA itself refuse them.

What is counted (``SyncCounter``, a ``torch.overrides.TorchFunctionMode``; which calls such a mode
sees in torch 2.14.1 is checked by ``test_the_counter_sees_what_would_wait_on_cuda``):

- reads of a value on the host: ``item``, ``tolist``, ``bool()`` (an ``if`` on a tensor),
  ``float()``, ``int()``, an index, formatting, ``numpy``, ``cpu``;
- calls whose output size depends on the values: ``nonzero``, ``argwhere``, ``unique``,
  ``masked_select``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``where`` with one
  argument, indexing with a boolean mask;
- copies from the host: ``.to()`` or ``.cuda()`` naming a device, ``copy_``, and ``tensor`` /
  ``as_tensor`` / ``asarray`` / ``new_tensor`` with a device. On a CPU every tensor is on the
  host, so a ``.to(device)`` of a tensor already on the device counts too: the proxy is stricter
  than CUDA. One such call is not counted: every ``self.log`` has Lightning move the logged
  result's stored states to the logged value's device (``_ResultCollection.log``). After the first
  step they are already there, and a ``.to`` to a tensor's own device returns the tensor itself,
  so on CUDA it is no copy and no wait (its first step copies the new state once, and is skipped
  by the GPU test).

The window of a step: from the datamodule's ``on_after_batch_transfer`` (after Lightning moved the
batch: the flips and the normalisation, or the cached view's choice) to the end of the module's
``on_train_batch_end``, which Lightning calls after every callback's. It holds every callback's
per-batch hooks (ours: the frozen norms held in eval, the clock, the progress line or bar), the
training step, backward, the optimizer and the schedule. Lightning's own logging runs after it:
every ``trainer.log_every_n_steps`` steps it turns each logged value into a float (one wait per
value, Lightning's, at 50 steps by default), and the tests log at every step to show it stays out.
The progress line's read of the loss every 30 s is by design and put off here (the fits are short
anyway). Calls to ``torch.cuda.synchronize`` are not seen by the mode; the step path makes none
(the clock synchronises at epoch boundaries).

Before this was counted, a step made 11 such calls on the uncached path (the mean, the std and
the flip mask copied to the device; 8 ``.to`` calls of torchmetrics re-placing its states when
the metric was called rather than updated) and 9 on the cached path (the mask and the 8), plus one
``item`` per step with the progress bar.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

import train
from simfreeze.data.datamodule import TaskDataModule
from simfreeze.runs.module import Classifier
from tests.helpers import REPO


def _functions(*names: str) -> dict:
    found = {}
    for name in names:
        obj = torch
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:  # not in this torch version
            continue
        found[obj] = name
    return found


# The host reads the device's values, or must learn the output's size from them: always a wait.
READS = _functions(
    "Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.__float__", "Tensor.__int__", "Tensor.__index__",
    "Tensor.__format__", "Tensor.__array__", "Tensor.numpy", "Tensor.cpu",
    "Tensor.nonzero", "nonzero", "Tensor.argwhere", "argwhere", "Tensor.unique", "unique",
    "Tensor.unique_consecutive", "unique_consecutive", "Tensor.masked_select", "masked_select",
    "Tensor.bincount", "bincount")
# A wait only with some arguments.
INDEXING = _functions("Tensor.__getitem__", "Tensor.__setitem__")
REPEATS = _functions("Tensor.repeat_interleave", "repeat_interleave")
WHERE = _functions("where")
MOVES = _functions("Tensor.to", "Tensor.cuda")
COPIES = _functions("Tensor.copy_")
FROM_DATA = _functions("tensor", "as_tensor", "asarray", "Tensor.new_tensor")
# Lightning re-places each logged result's states on the logged value's device at every self.log:
# a no-op on CUDA after the first step (see the module's docstring).
LIGHTNING_RESULTS = str(Path("lightning", "pytorch", "trainer", "connectors", "logger_connector", "result.py"))


def _is_mask(index) -> bool:
    if isinstance(index, (tuple, list)):
        return any(_is_mask(i) for i in index)
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _names_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args[1:])


def _called_from(path: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(path):
            return True
        frame = frame.f_back
    return False


TORCH = os.path.join(os.path.dirname(torch.__file__), "")  # torch's own frames


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(TORCH)):
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def would_wait(func, args, kwargs) -> str | None:
    """The name of a call that would make the host wait for a CUDA device, or None."""
    if func in READS:
        return READS[func]
    if func in INDEXING and len(args) > 1 and _is_mask(args[1]):
        return f"{INDEXING[func]} with a mask"
    if func in REPEATS and isinstance(kwargs.get("repeats", args[1] if len(args) > 1 else None), torch.Tensor) \
            and kwargs.get("output_size") is None:
        return f"{REPEATS[func]} without output_size"
    if func in WHERE and len(args) + len(kwargs) == 1:
        return "where (one argument)"
    if func in MOVES and (func is torch.Tensor.cuda or _names_device(args, kwargs)):
        return None if _called_from(LIGHTNING_RESULTS) else f"{MOVES[func]} (a device named)"
    if func in COPIES:
        return COPIES[func]
    if func in FROM_DATA and kwargs.get("device") is not None:
        return f"{FROM_DATA[func]} on a device"
    return None


class SyncCounter(TorchFunctionMode):
    """Records each call that would wait for a CUDA device, with where it was made."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = would_wait(func, args, kwargs)
        if why:
            self.calls.append(f"{why} at {_caller()}")
        return func(*args, **kwargs)


class StepWindows:
    """Runs ``enter(datamodule)`` where a training step's path starts and ``leave()`` where it ends
    (see the module's docstring), for every training step of every fit while installed."""

    def __init__(self, monkeypatch, enter, leave):
        self.enter, self.leave, self.inside = enter, leave, False
        transfer, batch_end = TaskDataModule.on_after_batch_transfer, Classifier.on_train_batch_end

        def on_after_batch_transfer(dm, batch, dataloader_idx):
            if dm.trainer is not None and dm.trainer.training:
                self.close()  # a step that raised never reached its end
                self.enter(dm)
                self.inside = True
            return transfer(dm, batch, dataloader_idx)

        def on_train_batch_end(module, *args):
            batch_end(module, *args)
            self.close()

        monkeypatch.setattr(TaskDataModule, "on_after_batch_transfer", on_after_batch_transfer)
        monkeypatch.setattr(Classifier, "on_train_batch_end", on_train_batch_end)

    def close(self):
        if self.inside:
            self.inside = False
            self.leave()


TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=2",
        "data.classes=[ant,bee]", "data.batch_size=8", "trainer.log_every_n_steps=1"]
# The target trains cached (a frozen prefix up to layer2); its source, trained first, uncached.
TRANSFER = ["arm=static45", "freeze.k=9", "+source.task.positive=ant", "data.positive=bee"]


def fit_watched(image_folder, tmp_path, monkeypatch, enter, leave, *overrides) -> dict:
    from simfreeze.runs.progress import EpochLines

    monkeypatch.setattr(EpochLines.__init__, "__defaults__", (3600.0,))  # no 30-s line within an epoch
    windows = StepWindows(monkeypatch, enter, leave)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*TINY, *TRANSFER, f"data.root={image_folder}",
                                f"source.cache_dir={tmp_path / 'sources'}", *overrides])
    try:
        return train.train(OmegaConf.to_container(cfg, resolve=True), tmp_path / "run")
    finally:
        windows.close()


def test_the_counter_sees_what_would_wait_on_cuda():
    """Each call the counter is meant to see, it sees once in torch 2.14.1 (a TorchFunctionMode sees
    Python-level calls only, not what runs inside them); what would not wait, it does not count."""
    x, mask = torch.rand(8), torch.rand(8) < 0.5
    waits = [lambda: x[0].item(), lambda: x.tolist(), lambda: bool(x[0] > 0), lambda: float(x[0]),
             lambda: int(x[0]), lambda: f"{x[0]:.2f}", lambda: x.numpy(), lambda: x.cpu(), lambda: x.nonzero(),
             lambda: torch.unique(x), lambda: x.unique(), lambda: x.masked_select(mask), lambda: x[mask],
             lambda: torch.where(mask), lambda: mask.to(x.device), lambda: mask.to("cpu"),
             lambda: torch.tensor([1.0], device=x.device), lambda: torch.empty(8).copy_(x),
             lambda: torch.repeat_interleave(x, mask.long())]
    for i, call in enumerate(waits):
        with SyncCounter() as counter:
            call()
        assert len(counter.calls) == 1, (i, counter.calls)
    no_waits = [lambda: torch.rand(8, device=x.device) < 0.5, lambda: torch.where(mask, x, -x),
                lambda: x.to(torch.float64), lambda: x[2:5], lambda: len(x), lambda: x.shape[0],
                lambda: x.isfinite() & mask, lambda: torch.tensor([1.0])]
    for i, call in enumerate(no_waits):
        with SyncCounter() as counter:
            call()
        assert counter.calls == [], (i, counter.calls)


@pytest.mark.parametrize("progress", ["lines", "bar"])
def test_a_training_step_would_not_wait_for_the_device(image_folder, tmp_path, monkeypatch, progress):
    """Both paths with flips, uncached (the source, trained first) and cached (the target): no call
    per step that would wait on CUDA. The bar reads its postfix (``item`` of train/loss) at a run's
    first step and at each epoch's last only (its ``postfix_every_s`` made longer than the fit)."""
    from simfreeze.runs.progress import Bar

    monkeypatch.setattr(Bar.__init__, "__defaults__", (3600.0,))
    steps = []  # per training step: cached or not, epoch, batches in the epoch, the calls counted

    def enter(dm):
        counter = SyncCounter().__enter__()
        steps.append({"cached": bool(dm.features), "epoch": dm.trainer.current_epoch,
                      "batches": dm.trainer.num_training_batches, "calls": counter.calls, "counter": counter})

    def leave():
        steps[-1]["counter"].__exit__(None, None, None)

    results = fit_watched(image_folder, tmp_path, monkeypatch, enter, leave, f"progress={progress}")
    assert results["prefix_cache"]["used"] and results["prefix_cache"]["views"] == 2
    assert sum(s["cached"] for s in steps) >= 8 and sum(not s["cached"] for s in steps) >= 8
    allowed, seen = [], {}
    for s in steps:  # the bar's reads: a run's first step, each epoch's last
        key = (s["cached"], s["epoch"])
        seen[key] = seen.get(key, 0) + 1
        allowed.append(progress == "bar" and ((s["epoch"] == 0 and seen[key] == 1) or seen[key] == s["batches"]))
    counted = [(s["cached"], s["epoch"], s["calls"]) for s, ok in zip(steps, allowed) if len(s["calls"]) > ok]
    assert counted == []
    assert all(call.startswith("Tensor.item at") for s in steps for call in s["calls"])
    assert progress == "lines" or any(s["calls"] for s in steps)  # the counter does see the bar's reads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_does_not_wait_for_the_gpu(image_folder, tmp_path, monkeypatch):
    """The same fit on a GPU, with ``torch.cuda.set_sync_debug_mode("error")`` within each step's
    window from the third step of each run (the first ones allocate memory and register what is
    logged): a sync there raises, and the fit fails naming it."""
    steps = []

    def enter(dm):
        steps.append(bool(dm.features))
        if dm.trainer.global_step >= 2:
            torch.cuda.set_sync_debug_mode("error")

    def leave():
        torch.cuda.set_sync_debug_mode(0)

    try:
        results = fit_watched(image_folder, tmp_path, monkeypatch, enter, leave, "progress=lines",
                              "trainer.accelerator=gpu", "trainer.devices=1")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert results["status"] == "ok" and results["prefix_cache"]["used"]
    assert steps.count(True) >= 8 and steps.count(False) >= 8
