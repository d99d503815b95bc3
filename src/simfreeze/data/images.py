"""Images: where they are read from (ImageFolder or torchvision's CIFAR-10) and how a uint8 batch
becomes the network's input on the device (resize, flips, normalisation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from simfreeze.errors import DataConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Per-channel statistics of the CIFAR-10 training set (0-1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ImageSource:
    """Items of named classes, listed by the source; ``load`` decodes some of them to uint8 NCHW."""

    classes: list[str]
    has_test: bool

    def class_size(self, name: str, stage: str = "train") -> int:
        raise NotImplementedError

    def load(self, name: str, indices: Sequence[int], stage: str = "train",
             size: tuple[int, int] | None = None, max_side: int | None = None) -> torch.Tensor:
        """uint8 NCHW images; ``size`` (H, W): the size every image is brought to (None: the first
        one's, or ``max_side`` square when the first is larger: the network never sees more)."""
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
                Path(e.path) for e in os.scandir(folder)
                if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()  # a folder named x.jpg is no image
            ) if folder.is_dir() else []
        return self._files[key]

    def class_size(self, name: str, stage: str = "train") -> int:
        return len(self.files(name, stage))

    def load(self, name: str, indices: Sequence[int], stage: str = "train",
             size: tuple[int, int] | None = None, max_side: int | None = None) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import to_dtype

        files = self.files(name, stage)
        images = []
        size = tuple(size) if size else None
        for i in indices:
            try:
                image = decode_image(str(files[i]), mode=ImageReadMode.RGB)
            except (RuntimeError, OSError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataConfigError(f"cannot decode image {files[i]}: {reason}") from err
            # 16-bit PNGs decode to uint16: scale to uint8, the range every batch is normalised from.
            image = image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)
            size = size or stored_size(tuple(image.shape[-2:]), max_side)
            # Mixed sizes (the normal case for a user's own folder): each image to one size as it is
            # decoded, so that one large image never holds its class's images at its size.
            images.append(image if tuple(image.shape[-2:]) == size else resize_uint8(image, size))
        if not images:
            return torch.empty(0, 3, *(size or (32, 32)), dtype=torch.uint8)
        return torch.stack(images)


def stored_size(first: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size a task's images are held at: the first image's, or ``max_side`` square (the size the
    network sees, ``data.image_size``) when the first is larger: holding more would only cost memory."""
    if max_side and max(first) > max_side:
        return max_side, max_side
    return first


def files_digest(root: Path, files: dict[str, dict[str, list[str]]]) -> str:
    """SHA-256 of ``files`` (stage → class → paths relative to ``root``, as ``split.json`` lists
    them): each path with its file's bytes. The same names may hold other images (CIFAR-10's class
    folders each number theirs 0000.jpg, …), so the names alone would not tell a swapped folder."""
    import hashlib

    digest = hashlib.sha256()
    for stage, classes in sorted(files.items()):
        for name, paths in sorted(classes.items()):
            for path in paths:
                digest.update(f"{stage}|{name}|{path}|".encode())
                digest.update(hashlib.sha256((root / path).read_bytes()).digest())
    return digest.hexdigest()


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True).round().clamp(0, 255).byte()[0]


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

    def load(self, name: str, indices: Sequence[int], stage: str = "train",
             size: tuple[int, int] | None = None, max_side: int | None = None) -> torch.Tensor:  # all 32×32
        rows = self._by_class[(stage, name)][list(indices)]
        return torch.from_numpy(self.sets[stage].data[rows.numpy()]).permute(0, 3, 1, 2).contiguous()


def open_source(dataset: str, root: str | None, download: bool, download_dir: str) -> ImageSource:
    """Detect the layout of ``root`` (ImageFolder or CIFAR-10 pickles), or fetch CIFAR-10."""
    if root:
        path = Path(root).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.is_file() else (
                "is a link to nothing (or a loop)" if path.is_symlink() else "does not exist")
            raise DataConfigError(
                f"data.root='{root}' {what}. Give an ImageFolder root (train/<class>/...), "
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


class NoBatchOfOne(torch.utils.data.BatchSampler):
    """Batches of ``batch_size`` indices in ``sampler``'s order, except that a last batch of one
    joins the batch before it: BatchNorm in training mode needs two values per channel, and one
    image would crash it (33 images in batches of 32). Otherwise the batches of a plain
    ``DataLoader(shuffle=…, batch_size=…)``, drawn from the same random numbers."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self):  # a generator: the sampler draws its order at the first batch, as a plain loader's does
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] = [*batches[-1], *last]
        yield from batches

    def __len__(self) -> int:
        batches = super().__len__()
        return batches - 1 if batches > 1 and len(self.sampler) % self.batch_size == 1 else batches


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
    crop: int = 0,
) -> torch.Tensor:
    """uint8 NCHW → normalised float NCHW (the default dtype): optional resize, random
    translations by up to ``crop`` pixels (``random_crops``) and random horizontal flips per batch.

    All of it runs on ``images``' device and nothing comes from the host: ``mean`` and ``std``
    must be on that device already (``TaskDataModule.prepare`` keeps a copy per device), and the
    flip mask is drawn there (``flip_mask``; a ``generator`` must be of that device)."""
    x = images.to(torch.get_default_dtype()).div_(255)
    if image_size and x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    if crop:
        x = random_crops(x, crop, generator)
    if flip:
        x = torch.where(flip_mask(x.shape[0], x.device, generator).view(-1, 1, 1, 1), x.flip(-1), x)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crops(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image shifted by its own random offset in [-pad, pad]² with zero fill: the padded random
    crop of the CIFAR recipes, drawn and gathered on ``x``'s device in one indexing step."""
    n, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device, generator=generator)
    rows = offsets[0] + torch.arange(height, device=x.device)  # (n, height)
    cols = offsets[1] + torch.arange(width, device=x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def flip_mask(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of ``n`` images to flip (each with probability 1/2), drawn on ``device``: no copy from
    the host, so no wait for the device. ``prepare_batch`` and ``pick_views`` both draw through
    here, so the cached and uncached paths flip the same images for the same random state (on a
    CPU the same numbers as a host draw, ``torch.rand(n) < 0.5``)."""
    return torch.rand(n, device=device, generator=generator) < 0.5


def pick_views(features: torch.Tensor, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of cached prefix outputs (B, views, ...) → (B, ...).

    View 1 holds the outputs for the flipped image; training takes it for a random half of the
    batch, drawn as ``prepare_batch`` draws it (``flip_mask``), so both paths flip the same images.
    """
    if features.shape[1] == 1 or not training:
        return features[:, 0]
    mask = flip_mask(features.shape[0], features.device, generator).view(-1, *([1] * (features.dim() - 2)))
    return torch.where(mask, features[:, 1], features[:, 0])
