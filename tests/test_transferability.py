"""LogME against the authors' reference implementation, and what it must rank."""

import math

import pytest
import torch

from simfreeze.method.transferability import logme


def features_and_labels(signal: float, n: int = 300, d: int = 64):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.randn(n, d, generator=generator).abs()  # post-ReLU-like
    features[:, :8] += signal * labels[:, None]
    return features, labels


def test_logme_equals_the_reference_implementation():
    # Values from the authors' numpy code (LogME._fit_icml: SVD of fᵀf, the same fixed point) on these inputs.
    # Both in float64: 1e-9 is about 10⁷ ulps, room for another LAPACK's blocking of the SVD.
    assert math.isclose(logme(*features_and_labels(3.0)), 0.6606104042465192, rel_tol=1e-9)
    assert math.isclose(logme(*features_and_labels(0.0)), -0.7468970543503224, rel_tol=1e-9)


def test_logme_ranks_features_that_separate_the_labels_higher_and_ignores_sample_order():
    scores = [logme(*features_and_labels(signal)) for signal in (0.0, 0.5, 1.0, 3.0)]
    assert scores == sorted(scores) and scores[-1] - scores[0] > 1
    features, labels = features_and_labels(1.0)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    assert math.isclose(logme(features[order], labels[order]), logme(features, labels), rel_tol=1e-9)
    three = torch.arange(len(labels)) % 3  # more than two classes: the mean over classes
    assert math.isfinite(logme(features, three))
    with pytest.raises(ValueError, match="N labels"):
        logme(features, labels[:-1])
