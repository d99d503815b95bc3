"""Freeze plans: how many leading layers to freeze (pure), and the callback that applies the plan.

Policies (``freeze.policy``):

- ``linear``: ``round(clip(S, 0, 1) · L_total)``, the paper's rule (seed 000).
- ``static``: exactly ``freeze.k`` layers (``k=45``: seed 001's 45/5 baseline for ResNet-50).
- ``none``: nothing frozen (full fine-tune, or training from scratch).
- ``head_only``: every layer but the head (a linear probe, seed 003's feature extraction).
- ``threshold``: the regimes of the paper's Fig. 3: ``S < low`` → ``freeze.fallback`` (a policy
  name: ``none`` by default), ``low ≤ S < high`` → linear, ``S ≥ high`` → ``L_total``.

``freeze.depth`` is a shorthand for depth sweeps, one axis holding fixed depths and the method:
``N`` → static with ``k = N``, ``dynamic`` → linear.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from torch import nn

from simfreeze.config import ConfigError
from simfreeze.layers import LayerMap

POLICIES = ("linear", "static", "none", "head_only", "threshold")
NEEDS_SIMILARITY = ("linear", "threshold")


def linear_depth(score: float, l_total: int) -> int:
    """The paper's ``L_freeze = round(S · L_total)`` with S clipped to [0, 1].

    Python's ``round`` halves to even; the paper's numbers never sit on a half, and ``floor(x + 0.5)``
    (halves up) is what a reader of ``round(S · L_total)`` expects.
    """
    if math.isnan(score):
        raise ConfigError("similarity S is NaN (an empty class or all-zero embeddings?)")
    return math.floor(min(max(score, 0.0), 1.0) * l_total + 0.5)


def depth_plan(depth: int | str) -> dict:
    """The ``freeze`` keys that ``freeze.depth`` stands for."""
    if depth == "dynamic":
        return {"policy": "linear"}
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ConfigError(f"freeze.depth={depth} must be a number of frozen layers or 'dynamic'")
    return {"policy": "static", "k": depth}


def validate_policy(policy: str, n_layers: int, k: int | None = None, low: float = 0.5,
                    high: float = 0.8, fallback: str = "none") -> None:
    if policy not in POLICIES:
        raise ConfigError(f"freeze.policy={policy} must be one of {', '.join(POLICIES)}")
    if policy == "static" and (k is None or not 0 <= k < n_layers):
        raise ConfigError(f"freeze.k={k} must lie in [0, {n_layers - 1}]: the head (layer {n_layers}) always trains")
    if policy == "threshold":
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"freeze.low={low}, freeze.high={high}: need 0 ≤ low ≤ high ≤ 1")
        if fallback not in ("none", "static", "head_only"):
            raise ConfigError(f"freeze.fallback={fallback} must be one of none, static, head_only")
        if fallback == "static":
            validate_policy("static", n_layers, k)


def frozen_depth(policy: str, n_layers: int, l_total: int, score: float | None = None, k: int | None = None,
                 low: float = 0.5, high: float = 0.8, fallback: str = "none") -> int:
    """How many leading layers a policy freezes (the head, layer ``n_layers``, never)."""
    validate_policy(policy, n_layers, k, low, high, fallback)
    if policy in NEEDS_SIMILARITY and score is None:
        raise ConfigError(f"freeze.policy={policy} needs a similarity score (similarity.enabled=true)")
    if policy == "static":
        return k
    if policy == "none":
        return 0
    if policy == "head_only":
        return n_layers - 1
    if policy == "linear":
        return linear_depth(score, l_total)
    if math.isnan(score):
        raise ConfigError("similarity S is NaN (an empty class or all-zero embeddings?)")
    if score < low:
        return frozen_depth(fallback, n_layers, l_total, k=k)
    if score < high:
        return linear_depth(score, l_total)
    return l_total


@dataclass(frozen=True)
class PlanRow:
    index: int        # 1-based, as in the paper's numbering
    name: str
    frozen: bool
    parameters: int


def plan_rows(net: nn.Module, layers: LayerMap, n_frozen: int) -> list[PlanRow]:
    def count(layer):
        return sum(p.numel() for m in layer.modules for p in net.get_submodule(m).parameters(recurse=False))
    return [PlanRow(i + 1, layer.name, i < n_frozen, count(layer)) for i, layer in enumerate(layers.layers)]


def frozen_modules(net: nn.Module, layers: LayerMap, n_frozen: int) -> list[nn.Module]:
    return [net.get_submodule(name) for layer in layers.layers[:n_frozen] for name in layer.modules]


def freeze_leading(net: nn.Module, layers: LayerMap, n_frozen: int) -> list[nn.Module]:
    """``requires_grad=False`` for the first ``n_frozen`` layers and every other layer trainable.

    Returns the frozen normalisation modules, which must stay in eval mode (see ``hold_eval``).
    """
    for i, layer in enumerate(layers.layers):
        for name in layer.modules:
            for p in net.get_submodule(name).parameters(recurse=False):
                p.requires_grad_(i >= n_frozen)
    norms = [m for m in frozen_modules(net, layers, n_frozen) if isinstance(m, nn.modules.batchnorm._NormBase)]
    hold_eval(norms)
    return norms


def hold_eval(modules: list[nn.Module]) -> None:
    """Frozen BatchNorm must not update its running statistics, which train mode would do."""
    for module in modules:
        module.eval()


class FreezeCallback(L.Callback):
    """Applies the plan in ``setup`` (before the optimizer exists) and keeps frozen BN in eval.

    ``score`` is read from the similarity callback when the policy needs one.
    """

    def __init__(self, layers: LayerMap, policy: str = "none", k: int | None = None, low: float = 0.5,
                 high: float = 0.8, fallback: str = "none", similarity=None, out_dir: Path | None = None):
        validate_policy(policy, len(layers), k, low, high, fallback)
        self.layers, self.policy, self.k = layers, policy, k
        self.low, self.high, self.fallback = low, high, fallback
        self.similarity, self.out_dir = similarity, out_dir
        self.n_frozen: int | None = None
        self.rows: list[PlanRow] = []
        self._norms: list[nn.Module] = []

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self.n_frozen is not None:
            return
        score = self.similarity.score if self.similarity is not None else None
        self.n_frozen = frozen_depth(self.policy, len(self.layers), self.layers.l_total, score, self.k,
                                     self.low, self.high, self.fallback)
        net = pl_module.net
        self._norms = freeze_leading(net, self.layers, self.n_frozen)
        self.rows = plan_rows(net, self.layers, self.n_frozen)
        if self.out_dir is not None and trainer.is_global_zero:
            (self.out_dir / "plan.json").write_text(json.dumps(self.record(), indent=1))
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("freeze/plan", self.markdown(), 0)

    def frozen_parameter_ids(self, net: nn.Module, depth: int) -> frozenset[int]:
        """Ids of the parameters a plan of ``depth`` frozen layers would freeze (nothing is changed)."""
        return frozenset(id(p) for m in frozen_modules(net, self.layers, depth) for p in m.parameters(recurse=False))

    def record(self) -> dict:
        return {"arch": self.layers.arch, "policy": self.policy, "score": getattr(self.similarity, "score", None),
                "l_total": self.layers.l_total, "n_layers": len(self.layers), "l_freeze": self.n_frozen,
                "first_trainable": next((r.name for r in self.rows if not r.frozen), None),
                "layers": [asdict(r) for r in self.rows]}

    def markdown(self) -> str:
        head = (f"policy **{self.policy}**, L_freeze = **{self.n_frozen}** of {len(self.layers)} layers "
                f"(L_total {self.layers.l_total})\n\n| # | layer | frozen | parameters |\n|---|---|---|---|\n")
        return head + "\n".join(f"| {r.index} | {r.name} | {'yes' if r.frozen else ''} | {r.parameters:,} |"
                                for r in self.rows)

    # Lightning puts the whole module in train mode at the start of fit and of every epoch, and
    # restores modes after validation; re-holding frozen BN before each step covers every path.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        hold_eval(self._norms)

    def load_state_dict(self, state_dict):
        self.n_frozen = state_dict.get("n_frozen")

    def state_dict(self):
        return {"n_frozen": self.n_frozen}

