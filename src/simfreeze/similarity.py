"""Class similarity: pooled embeddings → class centroids → cosine (pure), and the callback.

The embedding of an image is the input of the network's classifier head (for ResNet-50 the
2048-d global-average-pooled vector), taken with the network in eval mode and without grad, so
embedding leaves parameters and BatchNorm buffers untouched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import lightning as L
import torch
from torch import nn

from simfreeze.config import ConfigError


@torch.no_grad()
def pooled_features(net: nn.Module, head: str, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Inputs of ``net.<head>`` for every batch, as one (N, D) float tensor on the CPU."""
    captured: list[torch.Tensor] = []
    hook = net.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].flatten(1).float().cpu()))
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        for x in batches:
            net(x)
    finally:
        hook.remove()
        for module, training in modes.items():
            module.train(training)
    return torch.cat(captured) if captured else torch.empty(0)


def image_batches(images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                  device: torch.device) -> Iterable[torch.Tensor]:
    """uint8 images → prepared network inputs on ``device``, ``batch_size`` at a time."""
    return (prepare(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size))


def centroid(features: torch.Tensor) -> torch.Tensor:
    if len(features) == 0:
        raise ConfigError("a class used for similarity has no images")
    return features.mean(dim=0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``(a·b) / (‖a‖ ‖b‖)`` in float64; NaN when either vector is zero."""
    a, b = a.double(), b.double()
    denominator = a.norm() * b.norm()
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def cosine_matrix(centroids: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``centroids`` (C, D) → (C, C)."""
    unit = torch.nn.functional.normalize(centroids.double(), dim=1)
    return unit @ unit.T


def pair_spread(matrix: torch.Tensor, names: Sequence[str]) -> dict:
    """Min / median / max of S over the distinct class pairs (the upper triangle), with the pairs
    at the extremes: post-ReLU features bunch cosines near 1, so the spread says how much S can
    discriminate at all."""
    i, j = torch.triu_indices(len(names), len(names), offset=1)
    values = matrix[i, j].double()
    order = values.argsort()
    low, high = order[0], order[-1]
    return {"pairs": len(values), "min": float(values[low]), "median": float(values.median()),
            "max": float(values[high]), "min_pair": [names[i[low]], names[j[low]]],
            "max_pair": [names[i[high]], names[j[high]]]}


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The rows of ``points`` (C, D) on their first two principal axes, and the share of the
    variance each axis explains (the paper's Fig. 2 map of class centroids)."""
    centred = points.double() - points.double().mean(dim=0)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    share = (variance / variance.sum()).tolist() if variance.sum() > 0 else [0.0] * len(variance)
    return centred @ basis[:2].T, share[:2]


class SimilarityCallback(L.Callback):
    """Computes ``S = cos(centroid(source classes), centroid(target classes))`` in ``setup``.

    ``class_images(name)`` returns the uint8 images of a class; ``prepare`` turns a uint8 batch into
    the network's input. ``embedder`` is a network to embed with, or None for the model being
    trained (which holds the source weights before fit).
    """

    def __init__(self, class_images: Callable[[str], torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor],
                 source_classes: Sequence[str], target_classes: Sequence[str], head: str,
                 embedder: nn.Module | None = None, embedder_name: str = "source", matrix: bool = False,
                 batch_size: int = 256, out_dir: Path | None = None):
        self.class_images, self.prepare = class_images, prepare
        self.source_classes, self.target_classes = list(source_classes), list(target_classes)
        self.head, self.embedder, self.embedder_name = head, embedder, embedder_name
        self.matrix, self.batch_size, self.out_dir = matrix, batch_size, out_dir
        self.score: float | None = None
        self.seconds: float | None = None
        self.result: dict = {}
        # Prefix length → the unit whose output to keep per class (asked for by the prefix cache,
        # so its fill need not run the prefix over the training images a second time).
        self.capture: dict[int, nn.Module] = {}
        self.capture_budget_bytes = 0.0
        self.captured: dict[str, dict[int, torch.Tensor]] = {}

    def embed_class(self, net: nn.Module, name: str, device: torch.device) -> torch.Tensor:
        batches = image_batches(self.class_images(name), self.prepare, self.batch_size, device)
        kept: dict[int, list[torch.Tensor]] = {k: [] for k in self.capture}
        hooks = [unit.register_forward_hook(lambda module, args, out, k=k: kept[k].append(out.detach().cpu()))
                 for k, unit in self.capture.items()]
        try:
            features = pooled_features(net, self.head, batches)
        finally:
            for hook in hooks:
                hook.remove()
        self.captured[name] = {k: torch.cat(outs) for k, outs in kept.items() if outs}
        held = sum(t.numel() * t.element_size() for per_class in self.captured.values() for t in per_class.values())
        if held > self.capture_budget_bytes:  # too big to keep: the cache fill recomputes instead
            self.capture, self.captured = {}, {}
        return features

    def compute(self, net: nn.Module, device: torch.device) -> dict:
        names = list(dict.fromkeys(self.source_classes + self.target_classes))
        features = {name: self.embed_class(net, name, device) for name in names}
        centroids = {name: centroid(f) for name, f in features.items()}

        def pooled(group):  # centroid of a class set: the mean over all its images
            return centroid(torch.cat([features[name] for name in group]))

        score = cosine(pooled(self.source_classes), pooled(self.target_classes))
        result = {"S": score, "source_classes": self.source_classes, "target_classes": self.target_classes,
                  "embedder": self.embedder_name, "images_per_class": {n: len(f) for n, f in features.items()},
                  "dimension": int(next(iter(features.values())).shape[1])}
        if self.matrix:
            matrix = cosine_matrix(torch.stack([centroids[n] for n in names]))
            result["matrix"] = {"classes": names, "cosine": [[round(float(v), 6) for v in row] for row in matrix]}
        return result

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self.score is not None:
            return
        # setup runs before the strategy moves the model: embed on the device training will use.
        device = trainer.strategy.root_device
        start = time.perf_counter()
        net = (self.embedder if self.embedder is not None else pl_module.net).to(device)
        # Under the run's precision, as the fill and training run (bf16 autocast: 2.2× faster on a
        # CPU with native bf16, README Performance); the centroids and the cosine stay fp32 / fp64.
        with trainer.precision_plugin.forward_context():
            self.result = self.compute(net, device)
        self.seconds = time.perf_counter() - start
        self.score = self.result["S"]
        if self.out_dir is not None and trainer.is_global_zero:
            (self.out_dir / "similarity.json").write_text(json.dumps(self.result, indent=1))
        for logger in trainer.loggers:
            logger.log_metrics({"similarity/S": self.score}, step=0)
