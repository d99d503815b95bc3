"""Seed 001's cost model beside measured times: training k target models with or without a source.

The paper counts layers trained: ``N_classic = L · k`` (every model from scratch, ResNet-50: L = 50)
and ``N_transfer = F + (L − F) · k`` (the F frozen layers trained once, in the source; seed 001:
F = 45), and prices a layer at ``t`` = mean training time of one layer, so ``T = N · t``. Both are
linear in k; transfer has the smaller slope. The measured counterpart: ``k · scratch seconds`` and
``source seconds + k · transfer seconds``.
"""

from __future__ import annotations

from typing import Sequence


def layers_trained(k: int, total: int = 50, frozen: int = 45) -> tuple[int, int]:
    """``(N_classic, N_transfer)`` for k target models."""
    return total * k, frozen + (total - frozen) * k


def cost_table(scratch_seconds: float, source_seconds: float, transfer_seconds: float,
               ks: Sequence[int] = range(1, 11), total: int = 50, frozen: int = 45) -> list[dict]:
    """Predicted (formula, ``t = scratch_seconds / total``) and measured seconds for each k."""
    per_layer = scratch_seconds / total
    rows = []
    for k in ks:
        classic, transfer = layers_trained(k, total, frozen)
        rows.append({"k": k, "layers_classic": classic, "layers_transfer": transfer,
                     "predicted_classic_s": classic * per_layer, "predicted_transfer_s": transfer * per_layer,
                     "measured_classic_s": k * scratch_seconds,
                     "measured_transfer_s": source_seconds + k * transfer_seconds})
    return rows
