"""The LightningDataModule of a task: its split's images decoded once into uint8 tensors in memory,
served as whole batches and prepared on the device (or, with a frozen-prefix cache, the cached
prefix outputs in their place)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from simfreeze.data.images import (CIFAR10_MEAN, CIFAR10_STD, ImageFolderSource, ImageSource, NoBatchOfOne,
                                   TensorBatches, files_digest, keep_batch, open_source, pick_views, prepare_batch)
from simfreeze.data.splits import Split, balanced_split, group_quotas, shard, task_labels
from simfreeze.errors import DataConfigError


class TaskDataModule(L.LightningDataModule):
    """A balanced task over named classes, held in memory as uint8 tensors.

    The defaults are conf/data/cifar10.yaml's (tests/test_config.py holds them equal).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        download: bool = True,
        download_dir: str = "~/.cache/simfreeze/cifar10",
        classes: Sequence[str] = ("cat", "dog"),
        positive: str | None = None,
        groups: dict[str, Sequence[str]] | None = None,
        per_class: int = 800,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = 64,
        image_size: int | None = 64,
        flip: bool = True,
        crop: int = 0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        use_test: bool = True,
        holdout_per_class: int = 0,
        skip_per_class: int = 0,
        train_per_class: int | None = None,
    ):
        super().__init__()
        self.classes = list(classes)
        repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
        if repeated:
            raise DataConfigError(f"data.classes={self.classes} names {', '.join(repeated)} more than once; name each class once")
        if len(self.classes) < 2:
            raise DataConfigError(f"data.classes={self.classes} must name at least two classes")
        self.labels = task_labels(self.classes, positive)
        self.num_classes = len(set(self.labels.values()))
        # A class made of other classes (the staged AlexNet paper's "noise"): its images come from its members.
        self.groups = {name: list(members) for name, members in (groups or {}).items()}
        unused = [name for name in self.groups if name not in self.classes]
        if unused or any(not members for members in self.groups.values()):
            raise DataConfigError(f"data.groups={self.groups}: every group must be one of data.classes "
                                  f"{self.classes} and name at least one member class")
        self.members = {name: self.groups.get(name, [name]) for name in self.classes}
        real = [member for members in self.members.values() for member in members]
        if len(set(real)) != len(real):
            raise DataConfigError(f"data.groups={self.groups}: a member class is also a class or in two groups")
        self.label_of = {member: self.labels[name] for name, members in self.members.items() for member in members}
        self.dataset, self.root, self.download, self.download_dir = dataset, root, download, download_dir
        self.positive, self.per_class, self.val_fraction, self.seed = positive, per_class, val_fraction, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.image_size, self.flip, self.use_test, self.holdout_per_class = image_size, flip, use_test, holdout_per_class
        self.skip_per_class, self.train_per_class, self.crop = skip_per_class, train_per_class, crop
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # mean, std per device (``constants``)
        self.source: ImageSource | None = None
        self.split: Split | None = None
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.features: dict[str, torch.Tensor] = {}  # cached prefix outputs (N, views, ...) per stage
        self.stored_size: tuple[int, int] | None = None
        self.test_from: str | None = None  # where the test images come from (split.json, results.json, the summaries)
        # With DDP each process decodes, caches and serves only its share of every stage (set_shard).
        self.rank, self.world = 0, 1
        self.shares: dict[str, dict[str, tuple[int, int]]] = {}  # stage → class → (own images, held)
        self.total_sizes: dict[str, int] = {}  # images per stage over every process

    # -- building
    def plan_split(self) -> Split:
        """Open the data and choose the split's images, without decoding any."""
        if self.split is None:
            self.source = open_source(self.dataset, self.root, self.download, self.download_dir)
            unknown = [c for c in self.label_of if c not in self.source.classes]
            if unknown:
                key = "data.classes" if not self.groups else "data.classes / data.groups"
                raise DataConfigError(f"{key}: unknown class {unknown}; the data has {self.source.classes}")
            sizes = {name: self.source.class_size(name) for name in self.label_of}
            self.split = balanced_split(sizes, self.per_class, self.val_fraction, self.seed,
                                        group_quotas(self.groups, self.per_class),
                                        {name: self.holdout_per_class for name in sizes} | group_quotas(
                                            self.groups, self.holdout_per_class) if self.holdout_per_class else None,
                                        skip=self.skip_per_class, train_quotas=self.train_quotas())
        return self.split

    def train_quotas(self) -> dict[str, int] | None:
        """Training images per class when ``train_per_class`` caps them (a group's cap spread over its members)."""
        if self.train_per_class is None:
            return None
        return {name: self.train_per_class for name in self.label_of} | group_quotas(self.groups, self.train_per_class)

    def set_shard(self, rank: int, world: int) -> None:
        """Hold only DDP process ``rank``'s share of ``world`` (before ``setup``): each class's images
        split by ``simfreeze.data.splits.shard``, training shares padded to one length. The loaders
        then need no DistributedSampler (the trainer runs with ``use_distributed_sampler=False``)."""
        if self.tensors and (rank, world) != (self.rank, self.world):
            raise RuntimeError("set_shard must come before setup")
        self.rank, self.world = rank, world

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        self.plan_split()
        for stage_name, chosen in (("train", self.split.train), ("val", self.split.val)):
            self.tensors[stage_name] = self._load(chosen, "train", stage_name)
        # The final evaluation: the data's own test split when it has one (and use_test), else the held-out
        # slice of the training folder (holdout_per_class); the slice is never trained or validated on either way.
        everything = {}
        if self.use_test and self.source.has_test:
            everything = {name: list(range(self.source.class_size(name, "test"))) for name in self.label_of}
            # A group takes as many test images in all as one of its members has.
            quotas = group_quotas(self.groups, max(map(len, everything.values())))
            everything = {name: indices[:quotas.get(name, len(indices))] for name, indices in everything.items()}
        if any(everything.values()):
            self.tensors["test"] = self._load(everything, "test", "test")
            self.test_from = "the data's test split" + (" (test/)" if isinstance(self.source, ImageFolderSource) else "")
        elif self.split.holdout:
            self.tensors["test"] = self._load(self.split.holdout, "train", "test")
            self.test_from = (f"the training folder's held-out slice (the last {self.holdout_per_class} images of each "
                              f"class's order, never trained or validated on)")

    def _load(self, chosen: dict[str, list[int]], folder: str, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of ``chosen`` (class → image indices in ``folder``) as ``stage``."""
        images, labels = [], []
        self.total_sizes[stage] = sum(map(len, chosen.values()))
        self.shares[stage] = {}
        for name, indices in chosen.items():
            indices, own = shard(indices, self.rank, self.world, pad=stage == "train")
            self.shares[stage][name] = (own, len(indices))
            if not indices:
                continue
            # Every image of the task at one stored size: the first image's (resized on the device later).
            images.append(self.source.load(name, indices, folder, size=self.stored_size, max_side=self.image_size))
            self.stored_size = self.stored_size or tuple(images[-1].shape[-2:])
            labels.append(torch.full((len(indices),), self.label_of[name], dtype=torch.long))
        return torch.cat(images), torch.cat(labels)

    def class_images(self, name: str) -> torch.Tensor:
        """The training images of one class (or of every member of a group; uint8), in split order:
        with DDP this process's own share, without the padding."""
        self.setup()
        if name in self.groups:
            return torch.cat([self.class_images(member) for member in self.groups[name]])
        start = 0
        for other, (own, held) in self.shares["train"].items():
            if other == name:
                return self.tensors["train"][0][start:start + own]
            start += held
        raise DataConfigError(f"class '{name}' is not in this task's classes {self.classes}")

    def own(self, stage: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``stage`` that are this process's own (without the padding)."""
        images, labels = self.tensors[stage]
        if self.world == 1:
            return images, labels
        keep, start = [], 0
        for own, held in self.shares[stage].values():
            keep.append(torch.arange(start, start + own))
            start += held
        keep = torch.cat(keep)
        return images[keep], labels[keep]

    def prepare(self, images: torch.Tensor, flip: bool = False, crop: int = 0) -> torch.Tensor:
        """A uint8 batch as the network sees it (random flips only when ``flip``, random shifts of up
        to ``crop`` pixels), on its device."""
        mean, std = self.constants(images.device)
        x = prepare_batch(images, mean, std, self.image_size, flip=flip, crop=crop)
        return x.to(torch.get_default_dtype())  # bf16 inside a bf16-true forward (fp32 statistics promoted it)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` on ``device``: copied there on first use, not once per batch (a copy
        from the host each step would make a GPU wait). A new ``mean`` or ``std`` is copied again."""
        cached = self._constants.get(device)
        if cached is None or cached[0] is not self.mean or cached[1] is not self.std:
            cached = self._constants[device] = (self.mean, self.std, self.mean.to(device), self.std.to(device))
        return cached[2], cached[3]

    def split_record(self) -> dict:
        """Everything needed to rebuild the split: saved as ``split.json`` in the run directory."""
        record = {"classes": self.classes, "positive": self.positive, "labels": self.labels, "groups": self.groups,
                  "per_class": self.per_class, "val_fraction": self.val_fraction, "seed": self.seed,
                  "holdout_per_class": self.holdout_per_class, "skip_per_class": self.skip_per_class,
                  "train_per_class": self.train_per_class,
                  "test_from": self.test_from, "test_images": self.total_sizes.get("test", 0),
                  **self.split.to_json()}
        if isinstance(self.source, ImageFolderSource):
            record["files"] = {stage: {name: [str(self.source.files(name)[i].relative_to(self.source.root))
                                              for i in idx] for name, idx in chosen.items()}
                               for stage, chosen in self.split.to_json().items()}
        return record

    def files_digest(self) -> str | None:
        """A digest of the split's files, names and bytes (``simfreeze.data.images.files_digest``),
        which a resume compares; None for data that is not a folder of image files."""
        self.plan_split()
        return files_digest(self.source.root, self.split_record()["files"]) if isinstance(
            self.source, ImageFolderSource) else None

    def save_split(self, path: Path) -> None:
        path.write_text(json.dumps(self.split_record(), indent=1))

    @property
    def sizes(self) -> dict[str, int]:
        """Images per stage this process holds (with DDP: its share, see ``total_sizes``)."""
        return {stage: len(labels) for stage, (_, labels) in self.tensors.items()}

    # -- loaders
    def use_features(self, features: dict[str, torch.Tensor]) -> None:
        """Serve cached prefix outputs instead of images from now on (simfreeze.speed.prefix)."""
        self.features = features

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        images, labels = self.tensors[stage]
        data = TensorBatches(self.features.get(stage, images), labels)
        if stage == "train":  # trains in BatchNorm's training mode: never a batch of one
            order = RandomSampler(data) if shuffle else SequentialSampler(data)
            return DataLoader(data, batch_sampler=NoBatchOfOne(order, self.batch_size), collate_fn=keep_batch)
        return DataLoader(data, shuffle=shuffle, collate_fn=keep_batch, batch_size=self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # mean and std onto the device now, not in the first training step
            self.constants(self.trainer.strategy.root_device)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.tensors:
            return []
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        x = pick_views(images, training and self.flip) if self.features else self.prepare(
            images, flip=self.flip and training, crop=self.crop if training else 0)
        if self.trainer is not None:  # Lightning converted the uint8 batch before this hook: the network's dtype now
            x = self.trainer.precision_plugin.convert_input(x)
        return x, labels
