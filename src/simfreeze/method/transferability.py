"""LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML
2021): how well a network's features predict a target task's labels, without training it.

For each class, a Bayesian linear model from the features to that class's 0/1 indicator; the prior
precision ``alpha`` and noise precision ``beta`` are set by maximising the evidence (MacKay's fixed
point); the score is the log evidence per sample, averaged over the classes. Higher is better. Follows
the authors' reference implementation (``LogME._fit_icml``). Pure: tensors in, a float out.
"""

from __future__ import annotations

import math

import torch

EPSILON = 1e-5  # the reference implementation's guard against a zero denominator


def class_evidence(features: torch.Tensor, target: torch.Tensor, eigenvectors: torch.Tensor,
                   eigenvalues: torch.Tensor, max_steps: int = 11) -> float:
    """Log evidence per sample of the linear model ``features → target`` (N,) at its best alpha and beta.
    ``eigenvectors`` / ``eigenvalues``: of ``featuresᵀ features`` (shared by every class)."""
    n, d = features.shape
    alpha, beta = 1.0, 1.0
    ratio = alpha / beta
    projected = eigenvectors.T @ (features.T @ target)
    for _ in range(max_steps):  # the reference stops within 10 steps
        gamma = float((eigenvalues / (eigenvalues + ratio)).sum())
        weights = eigenvectors @ (projected * beta / (alpha + beta * eigenvalues))
        weight_norm = float((weights ** 2).sum())
        alpha = gamma / (weight_norm + EPSILON)
        residual = float(((target - features @ weights) ** 2).sum())
        beta = (n - gamma) / (residual + EPSILON)
        new_ratio = alpha / beta
        if abs(new_ratio - ratio) / ratio < 0.01:
            break
        ratio = new_ratio
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
                - 0.5 * float(torch.log(alpha + beta * eigenvalues).sum())
                - beta / 2 * (residual + EPSILON) - alpha / 2 * (weight_norm + EPSILON)
                - n / 2 * math.log(2 * math.pi))
    return evidence / n


def logme(features: torch.Tensor, labels: torch.Tensor) -> float:
    """LogME of ``features`` (N, D) for integer ``labels`` (N,): the mean over classes of the log
    evidence per sample (in float64)."""
    features = features.double()
    if features.ndim != 2 or len(features) != len(labels) or len(features) < 2:
        raise ValueError(f"logme needs (N, D) features and N labels, N ≥ 2; got {tuple(features.shape)} and {len(labels)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(features.T @ features)
    eigenvalues = eigenvalues.clamp_min(0)  # a symmetric PSD matrix: tiny negatives are rounding
    return sum(class_evidence(features, (labels == label).double(), eigenvectors, eigenvalues)
               for label in labels.unique().tolist()) / len(labels.unique())
