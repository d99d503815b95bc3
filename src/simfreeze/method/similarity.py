"""Class similarity: pooled embeddings → class centroids → cosine, and one measurement of S.

The embedding of an image is the input of the network's classifier head (for ResNet-50 the
2048-d global-average-pooled vector), taken with the network in eval mode and without grad, so
embedding leaves parameters and BatchNorm buffers untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from simfreeze.errors import ConfigError


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


def centred_cosine_matrix(centroids: torch.Tensor) -> torch.Tensor:
    """Cosine of the class centroids (C, D) after subtracting their mean: the mean embedding of all
    the classes when they hold equally many images. Post-ReLU features share a large common
    component that bunches plain cosines near 1; without it the classes' differences remain."""
    centroids = centroids.double()
    return cosine_matrix(centroids - centroids.mean(dim=0))


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


@dataclass(frozen=True)
class SimilarityTask:
    """What S compares: ``S = cos(centroid(source classes), centroid(target classes))``.

    ``class_images(name)`` returns the uint8 images of a class; ``prepare`` turns a uint8 batch into
    the network's input; ``head`` names the classifier head whose input is the embedding.
    ``embedder``: a network to embed with, or None for the model being trained (which holds the
    source weights before fit).
    """

    class_images: Callable[[str], torch.Tensor]
    prepare: Callable[[torch.Tensor], torch.Tensor]
    source_classes: Sequence[str]
    target_classes: Sequence[str]
    head: str
    embedder: nn.Module | None = None
    embedder_name: str = "source"
    matrix: bool = False
    batch_size: int = 64
    # Other depth predictors beside S (results' "scores"): the centred cosine, S after subtracting the
    # mean centroid of the compared classes and ``reference_classes`` (each class weighs the same;
    # the pass embeds them too), and LogME of the model before fit on the target's training images.
    scores: bool = False
    reference_classes: Sequence[str] = ()
    # With DDP each process embeds its share of a class; this joins every process's features
    # (``simfreeze.speed.distributed.gather_rows``), so S is over all the images.
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    # What decides S with an embedder of its own (its weights, the classes' images, the precision): a later
    # fit of the same process with the same key takes the earlier S instead of another pass.
    memo_key: str | None = None


@dataclass
class Similarity:
    """A measured S: ``record`` is ``similarity.json``; ``captured`` holds, per class, the outputs
    of the units asked for by prefix length (empty when they did not fit the budget)."""

    record: dict
    seconds: float
    captured: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.record["S"]


def measure_similarity(task: SimilarityTask, net: nn.Module, device: torch.device,
                       keep: dict[int, nn.Module] | None = None, keep_budget_bytes: float = 0.0) -> Similarity:
    """Embed every class of ``task`` with ``net`` on ``device`` and compare the centroids.

    ``keep``: prefix length → the unit whose output to keep per class as well (the frozen-prefix
    cache asks for them, so its fill need not run the prefix over the training images again);
    dropped as soon as they exceed ``keep_budget_bytes``.
    """
    start = time.perf_counter()
    keep = dict(keep or {})
    references = task.reference_classes if task.scores else ()
    names = list(dict.fromkeys([*task.source_classes, *task.target_classes, *references]))
    features, captured = {}, {}
    for name in names:
        kept: dict[int, list[torch.Tensor]] = {k: [] for k in keep}
        hooks = [unit.register_forward_hook(lambda module, args, out, k=k: kept[k].append(out.detach().cpu()))
                 for k, unit in keep.items()]
        try:
            batches = image_batches(task.class_images(name), task.prepare, task.batch_size, device)
            features[name] = pooled_features(net, task.head, batches)
            if task.gather is not None:
                features[name] = task.gather(features[name])
        finally:
            for hook in hooks:
                hook.remove()
        if not keep:
            continue
        captured[name] = {k: torch.cat(outs) for k, outs in kept.items() if outs}
        held = sum(t.numel() * t.element_size() for per_class in captured.values() for t in per_class.values())
        if held > keep_budget_bytes:  # too big to keep: the cache fill recomputes instead
            keep, captured = {}, {}

    def pooled(group):  # centroid of a class set: the mean over all its images
        return centroid(torch.cat([features[name] for name in group]))

    record = {"S": cosine(pooled(task.source_classes), pooled(task.target_classes)),
              "source_classes": list(task.source_classes), "target_classes": list(task.target_classes),
              "embedder": task.embedder_name, "images_per_class": {n: len(f) for n, f in features.items()},
              "dimension": int(next(iter(features.values())).shape[1])}
    if task.scores:
        mean = torch.stack([centroid(features[name]) for name in names]).mean(dim=0)
        record["scores"] = {"cosine": record["S"], "centred_cosine": cosine(pooled(task.source_classes) - mean,
                                                                            pooled(task.target_classes) - mean),
                            "centred_over": names}
    if task.matrix:
        matrix = cosine_matrix(torch.stack([centroid(features[n]) for n in names]))
        record["matrix"] = {"classes": names, "cosine": [[round(float(v), 6) for v in row] for row in matrix]}
    return Similarity(record, time.perf_counter() - start, captured)
