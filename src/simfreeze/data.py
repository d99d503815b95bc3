"""Tasks and data: balanced seeded splits (pure functions) and the LightningDataModule.

A *task* is a dataset, a list of class names, an optional positive class (binary "is it X?"
labels) and a split recipe (``per_class``, ``val_fraction``, ``seed``). Images are decoded once
into one uint8 tensor; batches are converted, resized, flipped and normalised on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from simfreeze.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Per-channel statistics of the CIFAR-10 training set (0-1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DataConfigError(ConfigError):
    """A task or data setting that cannot work; the message names the key and what is allowed."""


# --------------------------------------------------------------------------- splits (pure)


@dataclass(frozen=True)
class Split:
    """Indices into each class's sorted item list, per class name."""

    train: dict[str, list[int]]
    val: dict[str, list[int]]

    def to_json(self) -> dict:
        return {"train": self.train, "val": self.val}


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
    quotas: dict[str, int] | None = None,
) -> Split:
    """Take ``per_class`` items of every class (``quotas`` overrides it per class), the first
    ``round(val_fraction·quota)`` of them for validation: balanced, stratified, disjoint and
    deterministic. A class's items are a prefix of its seeded permutation, so a smaller quota
    takes a subset of a larger one's items, validation items included."""
    if not 0.0 < val_fraction < 1.0:
        raise DataConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    if per_class < 2:
        raise DataConfigError(f"data.per_class={per_class} must be at least 2")
    train, val = {}, {}
    for name, size in class_sizes.items():
        quota = (quotas or {}).get(name, per_class)
        n_val = round(val_fraction * quota)
        if n_val == 0 or n_val == quota:
            raise DataConfigError(
                f"data.val_fraction={val_fraction} with {quota} images of class '{name}' leaves "
                f"{n_val} validation and {quota - n_val} training images; both must be > 0"
            )
        if quota > size:
            raise DataConfigError(
                f"data.per_class={per_class} but class '{name}' has only {size} images"
                if quota == per_class else f"class '{name}' needs {quota} images but has only {size}"
            )
        chosen = class_permutation(size, name, seed)[:quota]
        val[name] = sorted(chosen[:n_val])
        train[name] = sorted(chosen[n_val:])
    return Split(train=train, val=val)


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


# --------------------------------------------------------------------------- sources


class ImageSource:
    """Items of named classes, listed by the source; ``load`` decodes some of them to uint8 NCHW."""

    classes: list[str]
    has_test: bool

    def class_size(self, name: str, stage: str = "train") -> int:
        raise NotImplementedError

    def load(self, name: str, indices: Sequence[int], stage: str = "train") -> torch.Tensor:
        raise NotImplementedError


class ImageFolderSource(ImageSource):
    """``root/train/<class>/*.jpg`` (+ optional ``root/test/<class>/...``), or ``root/<class>/...``."""

    def __init__(self, root: Path):
        self.root = root
        self.stage_dirs = {"train": root / "train" if (root / "train").is_dir() else root}
        if (root / "test").is_dir():
            self.stage_dirs["test"] = root / "test"
        self.has_test = "test" in self.stage_dirs
        self.classes = sorted(p.name for p in self.stage_dirs["train"].iterdir() if p.is_dir())
        self._files: dict[tuple[str, str], list[Path]] = {}

    def files(self, name: str, stage: str = "train") -> list[Path]:
        key = (stage, name)
        if key not in self._files:
            folder = self.stage_dirs[stage] / name
            self._files[key] = sorted(
                Path(e.path) for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES)
            ) if folder.is_dir() else []
        return self._files[key]

    def class_size(self, name: str, stage: str = "train") -> int:
        return len(self.files(name, stage))

    def load(self, name: str, indices: Sequence[int], stage: str = "train") -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        files = self.files(name, stage)
        images = []
        for i in indices:
            try:
                images.append(decode_image(str(files[i]), mode=ImageReadMode.RGB))
            except (RuntimeError, OSError) as err:
                raise DataConfigError(f"cannot decode image {files[i]}: {err}") from err
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) > 1:
            # Mixed sizes: bring every image to the first one's size so they stack.
            size = images[0].shape[-2:]
            images = [F.interpolate(img[None].float(), size=size, mode="bilinear",
                                    antialias=True).round().clamp(0, 255).byte()[0]
                      if img.shape[-2:] != size else img for img in images]
        return torch.stack(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)


class TorchvisionCIFAR10Source(ImageSource):
    """torchvision's CIFAR-10 (python pickles under ``root``; downloaded when allowed)."""

    def __init__(self, root: Path, download: bool):
        from torchvision.datasets import CIFAR10

        try:
            self.sets = {stage: CIFAR10(str(root), train=(stage == "train"), download=download)
                         for stage in ("train", "test")}
        except (RuntimeError, OSError) as err:  # missing files, or no network for the download
            raise DataConfigError(
                f"CIFAR-10 is not available under {root} ({err}). Point data.root (or the "
                f"CIFAR10_ROOT environment variable) at an ImageFolder root or a folder holding "
                f"cifar-10-batches-py, or allow data.download=true on a machine with internet."
            ) from err
        self.classes = list(self.sets["train"].classes)
        self.has_test = True
        self._by_class = {}
        for stage, ds in self.sets.items():
            targets = torch.as_tensor(ds.targets)
            for c, name in enumerate(self.classes):
                self._by_class[(stage, name)] = torch.nonzero(targets == c).flatten()

    def class_size(self, name: str, stage: str = "train") -> int:
        return len(self._by_class[(stage, name)])

    def load(self, name: str, indices: Sequence[int], stage: str = "train") -> torch.Tensor:
        rows = self._by_class[(stage, name)][list(indices)]
        return torch.from_numpy(self.sets[stage].data[rows.numpy()]).permute(0, 3, 1, 2).contiguous()


def open_source(dataset: str, root: str | None, download: bool, download_dir: str) -> ImageSource:
    """Detect the layout of ``root`` (ImageFolder or CIFAR-10 pickles), or fetch CIFAR-10."""
    if root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataConfigError(
                f"data.root='{root}' does not exist. Give an ImageFolder root (train/<class>/...), "
                f"set CIFAR10_ROOT, or leave data.root empty with data.download=true"
            )
        if (path / "cifar-10-batches-py").is_dir():
            return TorchvisionCIFAR10Source(path, download=False)
        source = ImageFolderSource(path)
        if not source.classes:
            raise DataConfigError(
                f"data.root='{root}' holds neither train/<class>/ image folders, <class>/ folders, "
                f"nor cifar-10-batches-py"
            )
        return source
    if dataset != "cifar10":
        raise DataConfigError(f"data.dataset='{dataset}' needs data.root (an ImageFolder root)")
    if not download:
        raise DataConfigError(
            "no CIFAR-10 data: set data.root=/path (or the CIFAR10_ROOT environment variable) "
            "to an ImageFolder root, or allow data.download=true"
        )
    return TorchvisionCIFAR10Source(Path(download_dir).expanduser(), download=True)


# --------------------------------------------------------------------------- batches


class TensorBatches(torch.utils.data.Dataset):
    """Whole-batch indexing of in-memory tensors: one fancy index per batch, no per-sample work."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def keep_batch(batch):
    return batch


def prepare_batch(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    image_size: int | None = None,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 NCHW → normalised float NCHW (the default dtype): optional resize and random
    horizontal flips per batch."""
    x = images.to(torch.get_default_dtype()).div_(255)
    if image_size and x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def pick_views(features: torch.Tensor, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of cached prefix outputs (B, views, ...) → (B, ...).

    View 1 holds the outputs for the flipped image; training takes it for a random half of the
    batch, drawing the same random numbers as ``prepare_batch`` so both paths flip the same images.
    """
    if features.shape[1] == 1 or not training:
        return features[:, 0]
    mask = torch.rand(features.shape[0], generator=generator) < 0.5
    mask = mask.to(features.device).view(-1, *([1] * (features.dim() - 2)))
    return torch.where(mask, features[:, 1], features[:, 0])


# --------------------------------------------------------------------------- DataModule


class TaskDataModule(L.LightningDataModule):
    """A balanced task over named classes, held in memory as uint8 tensors."""

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        download: bool = False,
        download_dir: str = "~/.cache/simfreeze/cifar10",
        classes: Sequence[str] = ("cat", "dog"),
        positive: str | None = None,
        groups: dict[str, Sequence[str]] | None = None,
        per_class: int = 800,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | None = None,
        flip: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        use_test: bool = True,
    ):
        super().__init__()
        self.classes = list(classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise DataConfigError(f"data.classes={self.classes} must name at least two distinct classes")
        self.labels = task_labels(self.classes, positive)
        self.num_classes = len(set(self.labels.values()))
        # A class made of other classes (seed 004's "noise"): its images come from its members.
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
        self.image_size, self.flip, self.use_test = image_size, flip, use_test
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.source: ImageSource | None = None
        self.split: Split | None = None
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.features: dict[str, torch.Tensor] = {}  # cached prefix outputs (N, views, ...) per stage

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
                                        group_quotas(self.groups, self.per_class))
        return self.split

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        self.plan_split()
        for stage_name, chosen in (("train", self.split.train), ("val", self.split.val)):
            self.tensors[stage_name] = self._load(chosen, "train")
        if self.use_test and self.source.has_test:
            everything = {name: list(range(self.source.class_size(name, "test"))) for name in self.label_of}
            # A group takes as many test images in all as one of its members has.
            quotas = group_quotas(self.groups, max(map(len, everything.values())))
            everything = {name: indices[:quotas.get(name, len(indices))] for name, indices in everything.items()}
            if any(everything.values()):
                self.tensors["test"] = self._load(everything, "test")

    def _load(self, chosen: dict[str, list[int]], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name, indices in chosen.items():
            if not indices:
                continue
            images.append(self.source.load(name, indices, stage))
            labels.append(torch.full((len(indices),), self.label_of[name], dtype=torch.long))
        return torch.cat(images), torch.cat(labels)

    def class_images(self, name: str) -> torch.Tensor:
        """The training images of one class (or of every member of a group; uint8), in split order."""
        self.setup()
        if name in self.groups:
            return torch.cat([self.class_images(member) for member in self.groups[name]])
        start = 0
        for other, indices in self.split.train.items():
            if other == name:
                return self.tensors["train"][0][start:start + len(indices)]
            start += len(indices)
        raise DataConfigError(f"class '{name}' is not in this task's classes {self.classes}")

    def prepare(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """A uint8 batch as the network sees it (random flips only when ``flip``)."""
        return prepare_batch(images, self.mean.to(images.device), self.std.to(images.device), self.image_size,
                             flip=flip)

    def split_record(self) -> dict:
        """Everything needed to rebuild the split: saved as ``split.json`` in the run directory."""
        record = {"classes": self.classes, "positive": self.positive, "labels": self.labels, "groups": self.groups,
                  "per_class": self.per_class, "val_fraction": self.val_fraction, "seed": self.seed,
                  **self.split.to_json()}
        if isinstance(self.source, ImageFolderSource):
            record["files"] = {stage: {name: [str(self.source.files(name)[i].relative_to(self.source.root))
                                              for i in idx] for name, idx in chosen.items()}
                               for stage, chosen in self.split.to_json().items()}
        return record

    def save_split(self, path: Path) -> None:
        path.write_text(json.dumps(self.split_record(), indent=1))

    @property
    def sizes(self) -> dict[str, int]:
        return {stage: len(labels) for stage, (_, labels) in self.tensors.items()}

    # -- loaders
    def use_features(self, features: dict[str, torch.Tensor]) -> None:
        """Serve cached prefix outputs instead of images from now on (see simfreeze.prefix)."""
        self.features = features

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        images, labels = self.tensors[stage]
        images = self.features.get(stage, images)
        return DataLoader(TensorBatches(images, labels), shuffle=shuffle, collate_fn=keep_batch,
                          batch_size=self.batch_size if stage == "train" else self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
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
        if self.features:
            return pick_views(images, training and self.flip), labels
        return self.prepare(images, flip=self.flip and training), labels


def shared_images(trained_on: Split, held_out: Split) -> dict[str, list[int]]:
    """Images a source task trained on that a target task validates on, per class (must be empty).

    Both splits must index the same data (same root): class name + index identifies an image.
    """
    overlap = {}
    for name, indices in trained_on.train.items():
        common = sorted(set(indices) & set(held_out.val.get(name, [])))
        if common:
            overlap[name] = common
    return overlap
