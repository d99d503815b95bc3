"""Shared fixtures: a small synthetic ImageFolder made in a temporary directory, and the real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, also for the runs a test starts
    # (torch's default of one thread per core, twice over, made the lane slower than one worker).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three classes of 30 train images (16×16), no test split."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), {"ant": 30, "bee": 30, "cow": 30})


@pytest.fixture(scope="session")
def image_folder_with_test(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder_test"), {"ant": 24, "bee": 24}, test_per_class=6)


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The real CIFAR-10 ImageFolder (CIFAR10_ROOT or ../shared/data/cifar10). CI must have it."""
    candidates = [os.environ.get("CIFAR10_ROOT"), REPO.parent / "shared" / "data" / "cifar10"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train" / "cat").is_dir():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("CI must provide the real CIFAR-10 folder (CIFAR10_ROOT or ../shared/data/cifar10)")
    pytest.skip("real CIFAR-10 folder not found (set CIFAR10_ROOT)")


def run_train(*overrides: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m train <overrides>`` in a fresh process, from ``cwd`` (not the repository)."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "train", *overrides], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m train failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def cat_dog_folder(tmp_path_factory) -> Path:
    """A synthetic stand-in for CIFAR-10 with the paper's class names (30 train, 5 test each)."""
    return make_image_folder(tmp_path_factory.mktemp("catdog"), {"bird": 30, "cat": 30, "dog": 30},
                             test_per_class=5)
