"""The similarity analysis (``similarity.analysis=true``, ``+experiment=similarity_matrix``): no
training; every class of the task is embedded and the paper's figures are written.

- ``similarity_matrix.{json,csv,png}``: the class × class cosine matrix of centroids (Fig. 1);
- ``centroids_pca.png``: the centroids on their first two principal axes (Fig. 2);
- ``freeze_vs_similarity.png``: ``L_freeze`` against S for this architecture's ``L_total`` and the
  configured thresholds, with every class pair's S marked (Fig. 3);
- the spread of S over all pairs (min / median / max) in the JSON and ``results.json``, and the
  centred cosine of every pair (``centred_cosine``: the mean of all centroids subtracted first);
- all figures and the spread also in TensorBoard (``tensorboard/``).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from simfreeze.data.datamodule import TaskDataModule
from simfreeze.method.plan import FreezeSpec
from simfreeze.method.similarity import (centred_cosine_matrix, centroid, cosine_matrix, image_batches, pair_spread,
                                         pca_2d, pooled_features)
from simfreeze.networks.build import build_network
from simfreeze.networks.layers import layer_map
from simfreeze.reports.plots import centroid_map, freeze_curve, similarity_heatmap
from simfreeze.runs.results import finish
from simfreeze.runs.sources import TrainFn, chain_stage, source_weights
from simfreeze.speed.precision import device_type

FIGURES = {"similarity_matrix": "similarity_matrix.png", "centroids_pca": "centroids_pca.png",
           "freeze_vs_similarity": "freeze_vs_similarity.png"}


def run(cfg: dict, run_dir: Path, overrides: list[str], train_source: TrainFn) -> dict[str, Any]:
    """The analysis as a run: its embedder is ``similarity.embedder`` as a training run takes it: the
    source model (``source``: a source task, trained once with ``train_source`` and cached, or
    ``source.weights``), a stage further up the chain (``source.source``: e.g. the pretrained base),
    torchvision weights or a checkpoint."""
    embedder = cfg["similarity"]["embedder"]
    key = "similarity.embedder"
    if embedder == "source":
        weights, key = source_weights(cfg, train_source)[0], ("source.weights" if not cfg["source"]["task"] else key)
    elif embedder.startswith("source.source"):
        weights = source_weights(chain_stage(cfg, embedder, key), train_source)[0]
    else:
        weights = embedder
    name = str(weights) if embedder == "source" else embedder if weights == embedder else f"{embedder} ({weights})"
    results = analyze(cfg, run_dir, weights, name, key)
    return finish(run_dir, {**results, "overrides": list(overrides)}, analysis_line)


def analyze(cfg: dict, run_dir: Path, weights: str | None, embedder_name: str,
            key: str = "similarity.embedder") -> dict[str, Any]:
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = TaskDataModule(**cfg["data"])
    datamodule.setup("fit")
    arch, spec = cfg["model"]["arch"], FreezeSpec.from_config(cfg["freeze"])
    net, record = build_network(arch, datamodule.num_classes, weights, key=key, **cfg["model"]["kwargs"])
    device = torch.device("cuda" if device_type(cfg["trainer"]["accelerator"]) == "cuda" else "cpu")
    net.to(device)
    names = datamodule.classes
    centroids, counts = [], {}
    for name in names:
        batches = image_batches(datamodule.class_images(name), datamodule.prepare, datamodule.eval_batch_size, device)
        features = pooled_features(net, record["head"], batches)
        centroids.append(centroid(features))
        counts[name] = len(features)
    centroids = torch.stack(centroids)
    matrix = cosine_matrix(centroids)
    spread = pair_spread(matrix, names)
    centred = centred_cosine_matrix(centroids)  # another score for the same pairs (docs/configuration.md, "Similarity")
    coords, explained = pca_2d(centroids)
    layers = layer_map(net, arch, spec.l_total)

    def depth(policy: str, score: float) -> int:
        return replace(spec, policy=policy).l_freeze(len(layers), layers.l_total, score)

    marks = {f"{names[i]}–{names[j]}": float(matrix[i, j]) for i in range(len(names)) for j in range(i + 1, len(names))}
    result = {
        "classes": names, "embedder": embedder_name, "weights": record, "images_per_class": counts,
        "dimension": int(centroids.shape[1]),
        "cosine": [[round(float(v), 6) for v in row] for row in matrix], "spread": spread,
        "centred_cosine": [[round(float(v), 6) for v in row] for row in centred],
        "centred_spread": pair_spread(centred, names),
        "pca": {"coords": [[round(float(v), 6) for v in row] for row in coords], "explained": explained},
        "l_total": layers.l_total, "n_layers": len(layers),
        "thresholds": {"low": spec.low, "high": spec.high, "fallback": spec.fallback},
        "pairs": {f"{names[i]}–{names[j]}": {"S": round(float(matrix[i, j]), 6), "centred": round(float(centred[i, j]), 6),
                                             "linear": depth("linear", float(matrix[i, j])),
                                             "threshold": depth("threshold", float(matrix[i, j]))}
                  for i in range(len(names)) for j in range(i + 1, len(names))},
    }
    (run_dir / "similarity_matrix.json").write_text(json.dumps(result, indent=1))
    with open(run_dir / "similarity_matrix.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *names])
        writer.writerows([name, *row] for name, row in zip(names, result["cosine"]))
    figures = {"similarity_matrix": similarity_heatmap(result["cosine"], names),
               "centroids_pca": centroid_map(coords, names, explained),
               "freeze_vs_similarity": freeze_curve(depth, layers.l_total, spec.low, spec.high, marks)}
    for key, figure in figures.items():
        figure.savefig(run_dir / FIGURES[key], dpi=120, bbox_inches="tight")
    log_figures(run_dir / "tensorboard", figures, spread)
    return {"status": "ok", "arm": cfg["arm"], "name": cfg["name"] or f"similarity:{len(names)} classes",
            "run_dir": str(run_dir), "embedder": embedder_name, "spread": spread, "l_total": layers.l_total,
            "seconds": round(time.perf_counter() - start, 3), "seed": cfg["seed"],
            "files": ["similarity_matrix.json", "similarity_matrix.csv", *FIGURES.values()]}


def log_figures(log_dir: Path, figures: dict, spread: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for key, figure in figures.items():
            writer.add_figure(f"similarity/{key}", figure)
        writer.add_text("similarity/spread", json.dumps(spread))
        for stat in ("min", "median", "max"):
            writer.add_scalar(f"similarity/S_{stat}", spread[stat], 0)


def analysis_line(results: dict[str, Any]) -> str:
    spread = results["spread"]
    return (f"[simfreeze] {results['name']}: S over {spread['pairs']} pairs min {spread['min']:.4f} "
            f"({'–'.join(spread['min_pair'])}) median {spread['median']:.4f} max {spread['max']:.4f} "
            f"({'–'.join(spread['max_pair'])}), embedder {results['embedder']}, {results['seconds']:.1f} s "
            f"→ {results['run_dir']}")
