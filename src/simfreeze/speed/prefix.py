"""Frozen-prefix caching: run the frozen leading units once, train the rest on their outputs.

The frozen prefix is the longest run of leading units (``simfreeze.networks.units``) with no
trainable parameter; with its BatchNorm in eval mode and no random augmentation before it, its
output for an image never changes, so it is computed once per image (and once more for the
horizontally flipped view when flips are on) and every epoch trains the remaining units on the
stored outputs. A run too short for the fill to pay off (fewer epochs than views), or a cache over
its budget, trains uncached. Functions only: ``simfreeze.runs.transfer`` decides when they run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from simfreeze.networks.units import Unit, run_units

log = logging.getLogger(__name__)


def frozen_prefix_length(units: list[Unit], frozen: set[int] | frozenset[int] | None = None) -> int:
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


def deepest_prefixes(units: list[Unit], plans: Iterable[frozenset[int]], most: int = 2) -> list[int]:
    """The ``most`` longest non-empty prefixes that any of ``plans`` (each: the ids of the parameters
    it would freeze) can give: where a pass run before the plan is known should keep its outputs."""
    return sorted({frozen_prefix_length(units, plan) for plan in plans} - {0}, reverse=True)[:most]


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


@dataclass
class PrefixCache:
    """The filled cache: per stage the prefix outputs (N, views, ...), and the units still to run."""

    prefix: list[Unit]
    suffix: list[Unit]
    features: dict[str, torch.Tensor]
    key: str
    refill: Callable[[], dict[str, torch.Tensor]]


def fill_prefix_cache(units: list[Unit], datamodule, device: torch.device, autocast: Callable[[], ContextManager],
                      precision: str, budget_bytes: float, batch_size: int, epochs: int | None,
                      reused: torch.Tensor | None = None, memo: dict | None = None) -> tuple[PrefixCache | None, dict]:
    """Fill the cache of the frozen prefix of ``units`` over every image of ``datamodule`` (its
    ``tensors``, ``prepare``, ``flip``), or say why not. Returns the cache (None: train uncached)
    and its record for ``results.json``.

    ``reused``: the training images' prefix outputs (view 0) from a pass that already ran the
    prefix (the similarity pass); ``autocast``: the run's precision context, under which the prefix
    runs as it would uncached (bf16 outputs, half the memory, with *-mixed). ``memo``: the caller's
    ``{(key, device): outputs}`` of an earlier fill of the same prefix on the same images (the rates of
    one setting, consecutive in a sweep or an ``lr_search`` job): found there, the outputs are taken,
    not computed again; a new fill replaces what it held.
    """
    k = frozen_prefix_length(units)
    if k == 0:
        return None, {"used": False, "reason": "no frozen prefix"}
    dm, prefix = datamodule, units[:k]
    if getattr(dm, "crop", 0):
        reason = f"data.crop={dm.crop} shifts every epoch's images anew: nothing to run once"
        log.info("prefix cache off: %s", reason)
        return None, {"used": False, "reason": reason}
    views = 2 if dm.flip else 1
    sizes = {stage: len(labels) for stage, (_, labels) in dm.tensors.items()}
    fill, uncached = prefix_passes(sizes, views, epochs, reused is not None)
    if fill > uncached:
        reason = f"the fill would run the prefix {fill} times, more than the {uncached} of {epochs} epoch(s) without it"
        log.info("prefix cache off: %s", reason)
        return None, {"used": False, "reason": reason}
    start = time.perf_counter()
    images = sum(n * (views if stage == "train" else 1) for stage, n in sizes.items())
    with autocast():  # the input as training sees it (bf16 under bf16-true)
        need, dtype = cache_bytes(prefix, dm.prepare(dm.tensors["train"][0][:1].to(device)), images)
    record = {"used": False, "boundary": units[k - 1][0], "units": k, "bytes": need,
              "dtype": str(dtype).removeprefix("torch.")}
    if need > budget_bytes:
        record["reason"] = f"needs {need / 2**30:.2f} GiB > cache.budget_gb={budget_bytes / 2**30:g}"
        log.warning("prefix cache off: %s", record["reason"])
        return None, record
    # The frozen prefix runs channels-last: 25-35 % faster in fp32 side by side on this CPU; the
    # outputs differ from the contiguous path by float rounding only.
    for _, unit in prefix:
        unit.to(memory_format=torch.channels_last)

    def outputs(images: torch.Tensor, flip: bool) -> torch.Tensor:
        def batches():
            for i in range(0, len(images), batch_size):
                x = dm.prepare(images[i:i + batch_size].to(device))
                yield (x.flip(-1) if flip else x).contiguous(memory_format=torch.channels_last)
        return prefix_outputs(prefix, batches()).contiguous()

    def fill_all(reused: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = {}
        for stage, (stage_images, _) in dm.tensors.items():
            flips = (False, True) if stage == "train" and views == 2 else (False,)
            with autocast():
                features[stage] = torch.stack([reused.to(dtype) if stage == "train" and not flip and reused is not None
                                               else outputs(stage_images, flip) for flip in flips], 1)
        return features

    # The key holds whether the similarity pass gave view 0: those outputs differ from a fill's by rounding.
    key = prefix_cache_key(prefix, dm, precision, reused is not None)
    features = memo.get((key, str(device))) if memo is not None else None
    remembered = features is not None
    if not remembered:
        if memo is not None:
            memo.clear()  # before the fill: two caches never held at once
        features = fill_all(reused)
        if memo is not None:
            memo[(key, str(device))] = features
    record.update(used=True, seconds=round(time.perf_counter() - start, 3), shape=list(features["train"].shape[2:]),
                  views=views, reused_similarity_pass=reused is not None, key=key, remembered=remembered)
    log.info("prefix cache: %d units up to %s, %.0f MiB, %.1f s%s", k, units[k - 1][0], need / 2**20,
             record["seconds"], " (an earlier fit's outputs, same key)" if remembered else "")
    return PrefixCache(prefix, units[k:], features, key, fill_all), record


def prefix_cache_key(prefix: list[Unit], datamodule, precision: str, reused: bool = False) -> str:
    dm = datamodule
    return prefix_key(prefix, [images for images, _ in dm.tensors.values()],
                      (dm.image_size, dm.flip, dm.mean.tolist(), dm.std.tolist(), precision, reused))
