"""Frozen-prefix caching: run the frozen leading blocks once, train the rest on their outputs.

A network is seen as a chain of *units* (ResNet: conv1, bn1, relu, maxpool, each residual block,
avgpool, flatten, fc) whose composition is its forward. The frozen prefix is the longest run of
leading units with no trainable parameter; with its BatchNorm in eval mode and no random
augmentation before it, its output for an image never changes, so it is computed once per image
(and once more for the horizontally flipped view when flips are on) and every epoch trains the
remaining units on the stored outputs. A run too short for the fill to pay off (fewer epochs than
views) trains uncached.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Iterable

import lightning as L
import torch
from torch import nn

Unit = tuple[str, nn.Module]
log = logging.getLogger(__name__)


def sequential_units(net: nn.Module) -> list[Unit] | None:
    """The chain of units of a torchvision ResNet / VGG / AlexNet / MobileNet / EfficientNet or our
    SmallCNN, or None for networks whose forward is not such a chain (they train uncached)."""
    from torchvision import models

    from simfreeze.model import SmallCNN  # here: simfreeze.model imports this module

    if isinstance(net, models.ResNet):
        units: list[Unit] = [(name, getattr(net, name)) for name in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(net, stage))]
        return units + [("avgpool", net.avgpool), ("flatten", nn.Flatten(1)), ("fc", net.fc)]
    if isinstance(net, (models.VGG, models.AlexNet, models.MobileNetV2, models.MobileNetV3,
                        models.EfficientNet, SmallCNN)):
        units = [(f"features.{i}", m) for i, m in enumerate(net.features)]
        units += [("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
        return units + [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)]
    return None


def run_units(units: Iterable[Unit], x: torch.Tensor) -> torch.Tensor:
    for _, unit in units:
        x = unit(x)
    return x


def frozen_prefix_length(units: list[Unit], frozen: set[int] | None = None) -> int:
    """How many leading units hold no trainable parameter (parameter-free units count as frozen).

    ``frozen``: ids of the parameters to treat as frozen (default: those with requires_grad off),
    so the prefix of a plan can be found before it is applied. Trailing parameter-free units (a
    ReLU, a pool) are left to the trainable side, so the cache sits at the output of the last
    frozen block. A dropout unit ends the prefix: its output is random.
    """
    def trainable(p):
        return p.requires_grad if frozen is None else id(p) not in frozen

    length = 0
    for i, (_, unit) in enumerate(units):
        if any(trainable(p) for p in unit.parameters()) or isinstance(unit, nn.Dropout):
            break  # trainable, or random: its output is not fixed
        if any(True for _ in unit.parameters()):
            length = i + 1
    return length


def prefix_key(prefix: list[Unit], images: list[torch.Tensor], preparation) -> str:
    """Digest of everything the cached outputs depend on: the prefix's parameters and buffers, the
    images, and how they are prepared (size, flips, normalisation, precision)."""
    digest = hashlib.blake2b(repr(preparation).encode(), digest_size=16)
    for _, unit in prefix:
        for tensor in (*unit.parameters(), *unit.buffers()):
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for tensor in images:
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prefix_passes(sizes: dict[str, int], views: int, epochs: int | None, reused: bool) -> tuple[int, float]:
    """Prefix forward passes with the cache (its fill) and without it (every epoch).

    ``sizes``: images per stage (train, val, test). The fill runs the prefix once per view of each
    training image, minus the view a shared similarity pass already computed, and once per other
    image; without the cache it runs once per training and validation image every epoch (and once
    per test image). ``epochs`` None or negative: unbounded, the cache always pays.
    """
    train, val = sizes.get("train", 0), sizes.get("val", 0)
    test = sum(sizes.values()) - train - val
    fill = train * views - (train if reused else 0) + val + test
    if epochs is None or epochs < 0:
        return fill, float("inf")
    return fill, epochs * (train + val) + test


@torch.no_grad()
def prefix_outputs(units: list[Unit], batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Outputs of the (frozen, eval-mode) prefix units for every batch, concatenated on the CPU."""
    return torch.cat([run_units(units, x).cpu() for x in batches])


def cache_bytes(units: list[Unit], example: torch.Tensor, outputs: int) -> tuple[int, torch.dtype]:
    """Memory of ``outputs`` stored prefix outputs, and their dtype (bf16 under autocast), from the
    output of one example."""
    with torch.no_grad():
        out = run_units(units, example[:1])
    return outputs * out[0].numel() * out.element_size(), out.dtype


class PrefixCacheCallback(L.Callback):
    """After the freeze plan (listed after FreezeCallback): fills the cache and switches the
    datamodule to serve it and the model to run only the units after the prefix.

    Falls back to the uncached path, with a log line saying why, when the network is not a chain
    of units, nothing is frozen, the fill would cost more prefix passes than it saves (see
    ``prefix_passes``), or the cache would exceed ``budget_gb``.
    """

    def __init__(self, datamodule, budget_gb: float = 4.0, batch_size: int = 256, similarity=None):
        self.datamodule, self.budget_bytes, self.batch_size = datamodule, budget_gb * 2**30, batch_size
        self.similarity = similarity  # a SimilarityCallback whose pass captured prefix outputs, if any
        self.record: dict = {"used": False}

    def request_captures(self, net: nn.Module, plans: list[frozenset[int]], most: int = 2) -> None:
        """Ask the similarity pass (a full forward of the training images, run before the plan is
        known) to keep the prefix outputs of the deepest ``most`` prefixes the plans can give.

        ``plans``: for each reachable freeze depth, the ids of the parameters it would freeze.
        """
        units = sequential_units(net)
        if units is None or self.similarity is None or self.similarity.embedder is not None:
            return
        lengths = sorted({frozen_prefix_length(units, plan) for plan in plans} - {0}, reverse=True)[:most]
        self.similarity.capture = {k: units[k - 1][1] for k in lengths}
        self.similarity.capture_budget_bytes = self.budget_bytes / 2  # the cache itself needs room too

    def _take_from_similarity_pass(self, k: int) -> torch.Tensor | None:
        """Training images' prefix outputs (view 0) from the similarity pass, when it kept them for
        this prefix and for every class of the task (in the task's order). Frees what it kept."""
        if self.similarity is None:
            return None
        captured, self.similarity.captured = self.similarity.captured, {}
        classes = list(self.datamodule.split.train)
        if not all(k in captured.get(name, {}) for name in classes):
            return None
        return torch.cat([captured[name][k] for name in classes]).contiguous()

    def _outputs(self, prefix: list[Unit], images: torch.Tensor, device, flip: bool) -> torch.Tensor:
        def batches():
            for i in range(0, len(images), self.batch_size):
                x = self.datamodule.prepare(images[i:i + self.batch_size].to(device))
                yield (x.flip(-1) if flip else x).contiguous(memory_format=torch.channels_last)
        return prefix_outputs(prefix, batches()).contiguous()

    def _fill(self, prefix: list[Unit], device, dtype, views: int, reused: torch.Tensor | None,
              precision_context) -> dict[str, torch.Tensor]:
        features = {}
        for stage_name, (stage_images, _) in self.datamodule.tensors.items():
            flips = (False, True) if stage_name == "train" and views == 2 else (False,)
            with precision_context():
                outputs = [reused.to(dtype) if stage_name == "train" and not f and reused is not None
                           else self._outputs(prefix, stage_images, device, f) for f in flips]
            features[stage_name] = torch.stack(outputs, 1)
        return features

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        units = sequential_units(pl_module.net)
        if units is None:
            self.record["reason"] = f"{type(pl_module.net).__name__} is not a chain of units"
            return
        k = frozen_prefix_length(units)
        reused = self._take_from_similarity_pass(k)
        if k == 0:
            self.record["reason"] = "no frozen prefix"
            return
        dm = self.datamodule
        prefix = units[:k]
        precision_context = trainer.precision_plugin.forward_context
        if self.record["used"] and dm.features and self.record["key"] == self._key(prefix, trainer):
            pl_module.suffix = units[k:]  # a later fit on the same prefix and images: still valid
            return
        views = 2 if dm.flip else 1
        sizes = {stage_name: len(labels) for stage_name, (_, labels) in dm.tensors.items()}
        fill, uncached = prefix_passes(sizes, views, trainer.max_epochs, reused is not None)
        if fill > uncached:
            self.record["reason"] = (f"the fill would run the prefix {fill} times, more than the "
                                     f"{uncached} of {trainer.max_epochs} epoch(s) without it")
            log.info("prefix cache off: %s", self.record["reason"])
            return
        start = time.perf_counter()
        device = trainer.strategy.root_device
        pl_module.to(device)
        example = dm.prepare(dm.tensors["train"][0][:1].to(device))
        images = sum(n * (views if stage_name == "train" else 1) for stage_name, n in sizes.items())
        # The prefix runs as it would uncached: under the precision's autocast (bf16 outputs, half
        # the memory, with *-mixed), in fp32 otherwise.
        with precision_context():
            need, dtype = cache_bytes(prefix, example, images)
        self.record.update(boundary=units[k - 1][0], units=k, bytes=need, dtype=str(dtype).removeprefix("torch."))
        if need > self.budget_bytes:
            self.record["reason"] = f"needs {need / 2**30:.2f} GiB > cache.budget_gb={self.budget_bytes / 2**30:g}"
            log.warning("prefix cache off: %s", self.record["reason"])
            return
        # The frozen prefix runs channels-last: 25-35 % faster in fp32 side by side on this CPU; the
        # outputs differ from the contiguous path by float rounding only.
        for _, unit in prefix:
            unit.to(memory_format=torch.channels_last)
        features = self._fill(prefix, device, dtype, views, reused, precision_context)
        dm.use_features(features)
        pl_module.suffix = units[k:]
        self._refill = lambda: self._fill(prefix, device, dtype, views, None, precision_context)
        self.record.update(used=True, seconds=round(time.perf_counter() - start, 3),
                           shape=list(features["train"].shape[2:]), views=views,
                           reused_similarity_pass=reused is not None, key=self._key(prefix, trainer))
        log.info("prefix cache: %d units up to %s, %.0f MiB, %.1f s", k, units[k - 1][0], need / 2**20,
                 self.record["seconds"])

    def _key(self, prefix: list[Unit], trainer) -> str:
        dm = self.datamodule
        return prefix_key(prefix, [images for images, _ in dm.tensors.values()],
                          (dm.image_size, dm.flip, dm.mean.tolist(), dm.std.tolist(), str(trainer.precision)))

    def on_fit_start(self, trainer, pl_module):
        """A checkpoint restored after setup (``ckpt_path``) could bring other prefix weights: the
        key says whether the cached outputs still hold; if not, they are recomputed in place."""
        if not self.record["used"] or trainer.ckpt_path is None:
            return  # nothing was restored since the fill: skip the digest
        prefix = sequential_units(pl_module.net)[:self.record["units"]]
        key = self._key(prefix, trainer)
        if key != self.record["key"]:
            log.warning("prefix cache: the frozen prefix changed after the fill (restored checkpoint?); refilling")
            for stage_name, fresh in self._refill().items():
                self.datamodule.features[stage_name].copy_(fresh)
            self.record["key"] = key
