"""Helpers shared by the tests (fixtures live in conftest.py): synthetic image folders, running
``python -m train`` in a fresh process, composing the config in-process, a module with a fixed recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from torchvision.io import write_png

REPO = Path(__file__).resolve().parents[1]
# fp32's unit roundoff: tolerances between two different fp32 computations are counted in it.
FP32_EPS = torch.finfo(torch.float32).eps
# The paper's protocol scaled down: resnet18 at 32×32, 20 images per class, one epoch.
SMALL = ["model.arch=resnet18", "data.image_size=null", "data.per_class=20", "trainer.max_epochs=1", "freeze.k=15",
         "progress=lines"]


def make_image_folder(root: Path, classes: dict[str, int], size: int = 16, test_per_class: int = 0) -> Path:
    """``root/train/<class>/*.png`` (+ ``root/test/...``): each class a different mean colour plus
    noise, so a small network can tell them apart in one epoch."""
    generator = torch.Generator().manual_seed(0)
    for stage, counts in (("train", classes), ("test", {c: test_per_class for c in classes})):
        for c, (name, count) in enumerate(counts.items()):
            folder = root / stage / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = torch.tensor([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 40) % 256])
            for i in range(count):
                noise = torch.randint(-40, 41, (3, size, size), generator=generator)
                image = (colour.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
                write_png(image, str(folder / f"{name}_{i:04d}.png"))
    return root


def run_train(*overrides: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m train <overrides>`` in a fresh process, from ``cwd`` (not the repository)."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "train", *overrides], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m train failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def compose_config(overrides: list[str] = (), hydra: bool = False):
    """The composed config of ``python -m train <overrides>`` (a DictConfig; ``hydra`` keeps the hydra node)."""
    from hydra import compose, initialize_config_dir

    from simfreeze.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", list(overrides), return_hydra_config=hydra)


def sgd_classifier(net: torch.nn.Module, num_classes: int = 2, **optimizer):
    """A Classifier with plain SGD (lr 0.05, momentum 0.9 unless given), no schedule, no smoothing."""
    from simfreeze.runs.module import Classifier

    return Classifier(net, num_classes, optimizer=partial(torch.optim.SGD, **{"lr": 0.05, "momentum": 0.9, **optimizer}),
                      scheduler=None, label_smoothing=0.0, channels_last=False)


def write_png16(path: Path, image: torch.Tensor) -> None:
    """A 16-bit RGB PNG of ``image`` (3, H, W, values 0-65535): torchvision writes 8-bit PNGs only."""
    import struct
    import zlib

    _, height, width = image.shape
    rows = image.permute(1, 2, 0).to(torch.int32).numpy().astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
