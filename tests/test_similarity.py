import math

import torch
import torchvision

from simfreeze.method.similarity import SimilarityTask, centroid, cosine, cosine_matrix, measure_similarity, pooled_features
from tests.helpers import FP32_EPS


def test_cosine_and_matrix():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert math.isclose(cosine(a, b), 1 / math.sqrt(2))
    assert cosine(a, -a) == -1.0 and math.isnan(cosine(a, torch.zeros(2)))
    matrix = cosine_matrix(torch.stack([a, b, -a]))
    assert torch.allclose(matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(matrix, matrix.T) and math.isclose(float(matrix[0, 1]), cosine(a, b))
    assert torch.equal(centroid(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), torch.tensor([2.0, 3.0]))


def test_pooled_features_are_the_head_input_and_leave_the_model_unchanged():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(6, 3, 32, 32)
    features = pooled_features(net, "fc", [x[:4], x[4:]])
    assert features.shape == (6, 512) and (features >= 0).all()  # post-ReLU average pool
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "BN buffers moved"
    assert net.training and all(m.training for m in net.modules())  # modes restored
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.fc(features), net(x), atol=1e-5)


def test_measure_scores_source_against_target_classes():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    images = {"cat": torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8),
              "dog": torch.randint(0, 255, (7, 3, 16, 16), dtype=torch.uint8)}
    task = SimilarityTask(images.__getitem__, lambda x: x.float() / 255, ["cat"], ["dog"], "fc", matrix=True,
                          batch_size=4)
    measured = measure_similarity(task, net, torch.device("cpu"))
    result = measured.record
    expected = cosine(pooled_features(net, "fc", [images["cat"].float() / 255]).mean(0),
                      pooled_features(net, "fc", [images["dog"].float() / 255]).mean(0))
    # Two fp32 computations: features and centroids in batches of 4 against one pass. oneDNN may block
    # the convolutions' and the means' sums differently per batch shape (it does with AMX), each off by
    # a few fp32 ulps; S, a ratio of their dot products, moves by about as much. 100 ulps of room.
    assert math.isclose(result["S"], expected, rel_tol=100 * FP32_EPS)
    assert result["images_per_class"] == {"cat": 5, "dog": 7} and result["dimension"] == 512
    assert result["matrix"]["classes"] == ["cat", "dog"]
    assert math.isclose(result["matrix"]["cosine"][0][1], expected, rel_tol=1e-5)
    assert measured.score == result["S"] and measured.captured == {}


def test_measure_keeps_the_outputs_asked_for_within_the_budget():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    images = {"cat": torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8),
              "dog": torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)}
    task = SimilarityTask(images.__getitem__, lambda x: x.float() / 255, ["cat"], ["dog"], "fc", batch_size=2)
    kept = measure_similarity(task, net, torch.device("cpu"), keep={4: net.maxpool}, keep_budget_bytes=1e9).captured
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(images["cat"].float() / 255))))
    # kept in batches of 2, stem in one batch of 5: the same maths, possibly another blocking (fp32 tolerances)
    torch.testing.assert_close(kept["cat"][4], stem)
    assert kept["dog"][4].shape[0] == 3
    # over the budget: nothing is kept (the cache then runs the prefix itself)
    assert measure_similarity(task, net, torch.device("cpu"), keep={4: net.maxpool}, keep_budget_bytes=10).captured == {}


def test_the_centred_cosine_subtracts_the_mean_centroid_of_every_class_in_the_pass():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    images = {name: torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8) for name in ("cat", "dog", "horse")}
    prepare = lambda x: x.float() / 255  # noqa: E731
    task = SimilarityTask(images.__getitem__, prepare, ["cat"], ["dog"], "fc", batch_size=4, scores=True,
                          reference_classes=["dog", "horse"])
    record = measure_similarity(task, net, torch.device("cpu")).record
    centroids = {n: pooled_features(net, "fc", [prepare(x)]).mean(0) for n, x in images.items()}
    mean = torch.stack(list(centroids.values())).mean(0)
    assert record["scores"]["centred_over"] == ["cat", "dog", "horse"] and record["images_per_class"]["horse"] == 4
    # Centroids of batches of 4 against one pass (a few fp32 ulps each, as above); subtracting the
    # common mean cancels most of a centroid, so its relative error grows by |centroid| / |centroid − mean|.
    growth = max(float(centroids[n].norm() / (centroids[n] - mean).norm()) for n in ("cat", "dog"))
    assert math.isclose(record["scores"]["centred_cosine"], cosine(centroids["cat"] - mean, centroids["dog"] - mean),
                        rel_tol=100 * FP32_EPS * growth)
    assert record["scores"]["cosine"] == record["S"] > record["scores"]["centred_cosine"]  # post-ReLU: bunched near 1
    plain = measure_similarity(SimilarityTask(images.__getitem__, prepare, ["cat"], ["dog"], "fc",
                                              reference_classes=["horse"]), net, torch.device("cpu")).record
    assert "scores" not in plain and "horse" not in plain["images_per_class"]  # only when asked for
