"""Shared fixtures: small synthetic ImageFolders made in temporary directories, and the real data
(helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, make_image_folder

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, also for the runs a test starts
    # (torch's default of one thread per core, twice over, made the lane slower than one worker).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def cat_dog_folder(tmp_path_factory) -> Path:
    """A synthetic stand-in for CIFAR-10 with the paper's class names (30 train, 5 test each)."""
    return make_image_folder(tmp_path_factory.mktemp("catdog"), {"bird": 30, "cat": 30, "dog": 30},
                             test_per_class=5)
