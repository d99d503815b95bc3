"""The class-similarity paper's figures and the cost model of Ivanov's 45/5 paper: the maths, and the
files a run writes."""

import csv
import json
import math

import pytest
import torch

from simfreeze.reports.cost import cost_markdown, cost_table, layers_trained
from simfreeze.reports.plots import similarity_heatmap
from simfreeze.method.similarity import cosine_matrix, pair_spread, pca_2d
from tests.helpers import run_train

PNG = b"\x89PNG\r\n\x1a\n"


def test_spread_names_the_extreme_pairs():
    matrix = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.5], [0.2, 0.5, 1.0]])
    spread = pair_spread(matrix, ["a", "b", "c"])
    assert spread["pairs"] == 3 and spread["min"] == pytest.approx(0.2) and spread["median"] == pytest.approx(0.5)
    assert spread["min_pair"] == ["a", "c"] and spread["max_pair"] == ["a", "b"]


def test_pca_of_centroids_on_a_line_is_one_axis():
    points = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 1.0], [2.0, 4.0, 1.0]])
    coords, explained = pca_2d(points)
    assert explained[0] == pytest.approx(1.0) and coords.shape == (3, 2)
    assert torch.allclose(coords[:, 1], torch.zeros(3, dtype=torch.double), atol=1e-9)
    assert (coords[2, 0] - coords[0, 0]).abs().item() == pytest.approx(math.sqrt(20))  # distances kept


def test_heatmap_annotations_are_the_matrix():
    matrix = cosine_matrix(torch.rand(4, 6))
    figure = similarity_heatmap(matrix.tolist(), ["a", "b", "c", "d"])
    shown = [float(t.get_text()) for t in figure.axes[0].texts]
    assert shown == pytest.approx([round(float(v), 3) for v in matrix.flatten()], abs=1e-9)


def test_cost_model_of_ivanovs_45_5_paper():
    assert layers_trained(3) == (150, 60)  # the paper's example: t = 1 h, k = 3 → 150 h vs 60 h
    rows = cost_table(scratch_seconds=100.0, source_seconds=100.0, transfer_seconds=30.0, ks=range(1, 4))
    assert [r["predicted_classic_s"] for r in rows] == pytest.approx([100, 200, 300])
    assert [r["predicted_transfer_s"] for r in rows] == pytest.approx([100, 110, 120])  # (45 + 5k) · 2 s
    assert [r["measured_transfer_s"] for r in rows] == pytest.approx([130, 160, 190])
    text = cost_markdown({"arm=static45": rows}, 100.0, shown=(1, 3))
    assert "30.0 s per model after a one-off source of 100.0 s (formula: 10.0 s per model)" in text


def test_similarity_analysis_writes_the_matrix_and_figures(cat_dog_folder, tmp_path):
    run_dir = tmp_path / "run"
    run_train("+experiment=similarity_matrix", "data.classes=[bird,cat,dog]", "model.arch=resnet18",
              "data.image_size=null", "data.per_class=20", "source.task.per_class=25", "trainer.max_epochs=1",
              f"data.root={cat_dog_folder}", f"hydra.run.dir={run_dir}", f"source.cache_dir={tmp_path / 'sources'}",
              cwd=tmp_path)
    result = json.loads((run_dir / "similarity_matrix.json").read_text())
    names, cosine = result["classes"], result["cosine"]
    assert names == ["bird", "cat", "dog"] and result["images_per_class"] == {n: 16 for n in names}
    rows = list(csv.reader(open(run_dir / "similarity_matrix.csv")))
    assert rows[0] == ["class", *names] and [[float(v) for v in r[1:]] for r in rows[1:]] == cosine
    off = [cosine[i][j] for i in range(3) for j in range(i + 1, 3)]
    assert result["spread"]["min"] == pytest.approx(min(off), abs=1e-6)
    assert result["spread"]["max"] == pytest.approx(max(off), abs=1e-6)
    pair = result["pairs"]["cat–dog"]
    assert pair["S"] == cosine[1][2] and pair["linear"] == math.floor(pair["S"] * result["l_total"] + 0.5)
    for name in ("similarity_matrix.png", "centroids_pca.png", "freeze_vs_similarity.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "results.json").read_text())["spread"] == result["spread"]


def test_the_centred_cosine_removes_the_shared_component():
    from simfreeze.method.similarity import centred_cosine_matrix

    shared = torch.tensor([10.0, 10.0, 10.0])
    centroids = torch.stack([shared + torch.tensor([1.0, 0, 0]), shared + torch.tensor([0, 1.0, 0]),
                             shared + torch.tensor([-1.0, -1.0, 0])])
    plain, centred = cosine_matrix(centroids), centred_cosine_matrix(centroids)
    assert plain[0, 1] > 0.99  # bunched near 1 by the shared part
    assert abs(float(centred[0, 1])) < 1e-9 and centred[0, 2] < 0  # orthogonal, opposed: what the classes differ by
    assert torch.allclose(centred.diagonal(), torch.ones(3, dtype=torch.float64))
