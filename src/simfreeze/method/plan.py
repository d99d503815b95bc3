"""How many leading layers to freeze: the freeze policies as pure functions of S (no torch, no Lightning).

Policies (``freeze.policy``):

- ``linear``: ``round(clip(S, 0, 1) · L_total)``, the class-similarity paper's rule.
- ``static``: exactly ``freeze.k`` layers (``k=45``: Ivanov's 45/5 baseline for ResNet-50).
- ``none``: nothing frozen (full fine-tune, or training from scratch).
- ``head_only``: every layer but the head (a linear probe, Khotsyanovsky's feature extraction).
- ``threshold``: the regimes of the class-similarity paper's Fig. 3: ``S < low`` → ``freeze.fallback``
  (a policy name: ``none`` by default), ``low ≤ S < high`` → linear, ``S ≥ high`` → ``L_total``.

``freeze.l_freeze`` is a shorthand for depth sweeps, one axis holding fixed depths and the method:
``N`` → static with ``k = N``, ``dynamic`` → linear.

The number of frozen layers is called ``l_freeze`` everywhere (the papers' ``L_freeze``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from simfreeze.errors import ConfigError

POLICIES = ("linear", "static", "none", "head_only", "threshold")
NEEDS_SIMILARITY = ("linear", "threshold")  # the policies whose depth follows S ("dynamic")
FALLBACKS = ("none", "static", "head_only")


def linear_depth(score: float, l_total: int) -> int:
    """The paper's ``L_freeze = round(S · L_total)`` with S clipped to [0, 1].

    Python's ``round`` halves to even; the paper's numbers never sit on a half, and ``floor(x + 0.5)``
    (halves up) is what a reader of ``round(S · L_total)`` expects.
    """
    if math.isnan(score):
        raise ConfigError("similarity S is NaN (an empty class or all-zero embeddings?)")
    return math.floor(min(max(score, 0.0), 1.0) * l_total + 0.5)


@dataclass(frozen=True)
class FreezeSpec:
    """The ``freeze`` settings of a run, checked once (``check``) against the network's layer count.

    The defaults are conf/train.yaml's ``freeze`` section (tests/test_config.py holds them equal).
    ``l_total`` None: the architecture's default (``simfreeze.networks.layers``).
    """

    policy: str = "none"
    k: int | None = 45
    low: float = 0.5
    high: float = 0.8
    fallback: str = "none"
    l_total: int | None = None
    # The key that set ``k``, for messages: freeze.k, or the freeze.l_freeze shorthand the user gave.
    k_key: str = field(default="freeze.k", compare=False, repr=False)

    @classmethod
    def from_config(cls, freeze: dict) -> FreezeSpec:
        """From the config's ``freeze`` section; ``l_freeze`` (the sweep shorthand) becomes policy and k."""
        fields = {key: value for key, value in freeze.items() if key not in ("l_freeze", "depth")}
        depth, old = freeze.get("l_freeze"), freeze.get("depth")  # ``depth``: the deprecated name
        if old is not None and depth is not None and old != depth:
            raise ConfigError(f"freeze.l_freeze={depth} and freeze.depth={old} (its deprecated name) disagree")
        key, depth = ("freeze.depth", old) if depth is None else ("freeze.l_freeze", depth)
        if depth == "dynamic":
            fields["policy"] = "linear"
        elif depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, int):
                raise ConfigError(f"{key}={depth} must be a number of frozen layers or 'dynamic'")
            fields.update(policy="static", k=depth, k_key=key)
        return cls(**fields)

    @property
    def needs_similarity(self) -> bool:
        return self.policy in NEEDS_SIMILARITY

    def check(self, n_layers: int) -> FreezeSpec:
        """Raise a ConfigError for settings that cannot work with ``n_layers`` layers; return self."""
        if self.policy not in POLICIES:
            raise ConfigError(f"freeze.policy={self.policy} must be one of {', '.join(POLICIES)}")
        if self.policy == "static" and (self.k is None or not 0 <= self.k < n_layers):
            raise ConfigError(f"{self.k_key}={self.k} must lie in [0, {n_layers - 1}]: the head (layer {n_layers}) "
                              f"always trains")
        if self.policy == "threshold":
            if not 0.0 <= self.low <= self.high <= 1.0:
                raise ConfigError(f"freeze.low={self.low}, freeze.high={self.high}: need 0 ≤ low ≤ high ≤ 1")
            if self.fallback not in FALLBACKS:
                raise ConfigError(f"freeze.fallback={self.fallback} must be one of {', '.join(FALLBACKS)}")
            if self.fallback == "static":
                replace(self, policy="static").check(n_layers)
        return self

    def l_freeze(self, n_layers: int, l_total: int, score: float | None = None) -> int:
        """How many leading layers this plan freezes (the head, layer ``n_layers``, never)."""
        self.check(n_layers)
        if self.needs_similarity and score is None:
            raise ConfigError(f"freeze.policy={self.policy} needs a similarity score (similarity.enabled=true)")
        if self.policy == "static":
            return self.k
        if self.policy == "none":
            return 0
        if self.policy == "head_only":
            return n_layers - 1
        if self.policy == "linear":
            return linear_depth(score, l_total)
        if math.isnan(score):
            raise ConfigError("similarity S is NaN (an empty class or all-zero embeddings?)")
        if score < self.low:
            return replace(self, policy=self.fallback).l_freeze(n_layers, l_total)
        if score < self.high:
            return linear_depth(score, l_total)
        return l_total

    def reachable(self, n_layers: int, l_total: int) -> list[int]:
        """Every ``l_freeze`` this plan can give, whatever S turns out to be."""
        if not self.needs_similarity:
            return [self.l_freeze(n_layers, l_total)]
        fallback = [replace(self, policy=self.fallback).l_freeze(n_layers, l_total)] if self.policy == "threshold" else []
        return sorted({*range(l_total + 1), *fallback})
