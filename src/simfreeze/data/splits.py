"""Balanced, seeded class splits: pure functions of class sizes, a recipe and a seed.

A *task* is a dataset, a list of class names, an optional positive class (binary "is it X?"
labels) and a split recipe (``per_class``, ``val_fraction``, ``seed``). A class's images depend
only on ``(seed, class name)``, so two tasks over the same classes see the same images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from simfreeze.errors import DataConfigError


@dataclass(frozen=True)
class Split:
    """Indices into each class's sorted item list, per class name. ``holdout``: images kept for the
    final evaluation only (the end of each class's permutation; empty unless asked for)."""

    train: dict[str, list[int]]
    val: dict[str, list[int]]
    holdout: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"train": self.train, "val": self.val, **({"holdout": self.holdout} if self.holdout else {})}


def class_permutation(n_items: int, class_name: str, seed: int) -> list[int]:
    """A permutation of ``range(n_items)`` that depends only on ``(seed, class_name)``.

    Seeding per class keeps a class's images the same whatever the other classes, the positive
    class or any unrelated key say, so the paper's cat and dog tasks see the same images.
    """
    digest = hashlib.sha256(f"{seed}:{class_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(n_items, generator=generator).tolist()


def balanced_split(
    class_sizes: dict[str, int], per_class: int, val_fraction: float, seed: int,
    quotas: dict[str, int] | None = None, holdout: dict[str, int] | None = None, skip: int = 0,
    train_quotas: dict[str, int] | None = None,
) -> Split:
    """Take ``per_class`` items of every class (``quotas`` overrides it per class), the first
    ``round(val_fraction·quota)`` of them for validation: balanced, stratified, disjoint and
    deterministic. A class's items are a prefix of its seeded permutation, so a smaller quota
    takes a subset of a larger one's items, validation items included.

    ``holdout``: per class, how many items to keep for the final evaluation: the *last* ones of the
    same permutation, so no task over that class with the same seed (whatever its ``per_class``, as
    long as the two fit) ever trains or validates on them.

    ``train_quotas``: per class, at most that many training items: the first ones of its training
    share, so a smaller quota trains on a subset of a larger one's images and every quota validates
    on the same images (a data-size axis judged on one validation set)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    if per_class < 2:
        raise DataConfigError(f"data.per_class={per_class} must be at least 2")
    if skip < 0:
        raise DataConfigError(f"data.skip_per_class={skip} must be ≥ 0")
    train, val, held = {}, {}, {}
    for name, size in class_sizes.items():
        quota = (quotas or {}).get(name, per_class)
        kept = (holdout or {}).get(name, 0)
        if kept and skip + quota + kept > size:
            raise DataConfigError(f"data.per_class={per_class} + data.holdout_per_class={kept}"
                                  f"{f' + data.skip_per_class={skip}' if skip else ''} exceed the {size} "
                                  f"images of class '{name}'")
        n_val = round(val_fraction * quota)
        if n_val == 0 or n_val == quota:
            raise DataConfigError(
                f"data.val_fraction={val_fraction} with {quota} images of class '{name}' leaves "
                f"{n_val} validation and {quota - n_val} training images; both must be > 0"
            )
        if skip + quota > size:
            needs = f"data.per_class={per_class}" if quota == per_class else f"class '{name}' needs {quota} images"
            raise DataConfigError(f"{needs}{f' after data.skip_per_class={skip}' if skip else ''} but class '{name}' "
                                  f"has only {size} images")
        permutation = class_permutation(size, name, seed)
        chosen = permutation[skip:skip + quota]
        cap = (train_quotas or {}).get(name)
        if cap is not None and not 1 <= cap <= quota - n_val:
            raise DataConfigError(f"data.train_per_class={cap} must lie in [1, {quota - n_val}]: class '{name}' has "
                                  f"{quota - n_val} training images of data.per_class={quota} after "
                                  f"{n_val} for validation; raise data.per_class for more")
        val[name] = sorted(chosen[:n_val])
        train[name] = sorted(chosen[n_val:n_val + cap] if cap is not None else chosen[n_val:])
        if kept:
            held[name] = sorted(permutation[size - kept:])
    return Split(train=train, val=val, holdout=held)


def group_quotas(groups: dict[str, Sequence[str]], per_class: int) -> dict[str, int]:
    """Images per member class of each group: a group's ``per_class`` images spread evenly over
    its members (the first ones take the remainder)."""
    quotas = {}
    for members in groups.values():
        share, extra = divmod(per_class, len(members))
        quotas.update({member: share + (i < extra) for i, member in enumerate(members)})
    return quotas


def task_labels(classes: Sequence[str], positive: str | None) -> dict[str, int]:
    """Label of each class: its position, or 1 for ``positive`` and 0 for every other class."""
    if positive is None:
        return {name: i for i, name in enumerate(classes)}
    if positive not in classes:
        raise DataConfigError(f"data.positive='{positive}' is not one of data.classes={list(classes)}")
    return {name: int(name == positive) for name in classes}


def shared_images(trained_on: Split, held_out: Split) -> dict[str, list[int]]:
    """Images a source task trained on that a target task validates or is finally evaluated on
    (its holdout), per class (must be empty).

    Both splits must index the same data (same root): class name + index identifies an image.
    """
    overlap = {}
    for name, indices in trained_on.train.items():
        common = sorted(set(indices) & (set(held_out.val.get(name, [])) | set(held_out.holdout.get(name, []))))
        if common:
            overlap[name] = common
    return overlap


def shard(indices: Sequence[int], rank: int, world: int, pad: bool) -> tuple[list[int], int]:
    """The share of one class's images that DDP process ``rank`` of ``world`` holds: every
    ``world``-th image from ``rank`` on, and how many of them are its own (the rest is padding).

    ``pad``: repeat images from the start of the list so that every process holds
    ``ceil(len / world)`` — training needs the same number of batches on every process, or the
    gradient all-reduce of the longer one waits forever. Evaluation shards are not padded: the
    synced metrics then count every image exactly once.
    """
    own = list(indices[rank::world])
    if not pad or not indices:
        return own, len(own)
    share = -(-len(indices) // world)
    return own + [indices[i % len(indices)] for i in range(share - len(own))], len(own)
