"""A resume continues its run or changes nothing (README, "What a run leaves"): a failed checkpoint
write keeps the previous one, and a swapped data root is refused."""

import errno
import os
import shutil

import pytest
import torch

from simfreeze.errors import ConfigError
from tests.helpers import make_image_folder
from tests.test_checkpoints import fit, load

# 2 classes × 16 training images, batches of 8: 4 steps an epoch, 2 epochs, last.ckpt after each.
TWO_EPOCHS = ["trainer.max_epochs=2", "checkpoint.last_every_n_epochs=1", "trainer.log_every_n_steps=1"]


def snapshot(run_dir, skip=()) -> dict[str, bytes]:
    """Every file under ``run_dir`` (but those whose first path part is in ``skip``) with its bytes."""
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*"))
            if path.is_file() and path.relative_to(run_dir).parts[0] not in skip}


def numbered_folder(root):
    """Two classes whose files have the same names in each folder (0000.png, …), as CIFAR-10's."""
    make_image_folder(root, {"ant": 20, "bee": 20})
    for folder in (root / "train").iterdir():
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"{i:04d}.png")
    return root


def test_a_resume_on_a_data_root_whose_images_differ_is_refused_and_a_moved_one_resumes(tmp_path):
    original = numbered_folder(tmp_path / "original")
    run_dir = tmp_path / "run"
    one_epoch = ["data.classes=[ant,bee]", "trainer.max_epochs=1"]
    fit(original, run_dir, *one_epoch)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = snapshot(run_dir)
    swapped = shutil.copytree(original, tmp_path / "swapped")
    (swapped / "train" / "ant").rename(swapped / "train" / "tmp")
    (swapped / "train" / "bee").rename(swapped / "train" / "ant")
    (swapped / "train" / "tmp").rename(swapped / "train" / "bee")
    with pytest.raises(ConfigError, match=f"^ckpt_path: data.root='{swapped}' holds other images") as caught:
        fit(swapped, run_dir, *one_epoch, f"ckpt_path={last}")
    assert "\n" not in str(caught.value)
    assert snapshot(run_dir) == before
    moved = shutil.move(original, tmp_path / "moved")  # the same images elsewhere: the same run
    assert fit(moved, tmp_path / "resumed", *one_epoch, f"ckpt_path={last}")["status"] == "ok"


def failing_save(monkeypatch, when) -> None:
    """``torch.save`` that, ``when(obj)``, writes half of the checkpoint and fails as a full disk does."""
    import io

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if not when(obj):
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_leaves_no_temporary(image_folder, tmp_path,
                                                                                      monkeypatch):
    run_dir = tmp_path / "run"
    steps = []

    def second_last_ckpt(obj):  # last.ckpt holds the optimizer's state, best.ckpt weights only
        steps.append(obj.get("global_step"))
        return "optimizer_states" in obj and obj["global_step"] == 8
    failing_save(monkeypatch, second_last_ckpt)
    with pytest.raises(ConfigError) as caught:
        fit(image_folder, run_dir, *TWO_EPOCHS)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert str(caught.value) == f"no space left on device writing {last}; the previous one is kept"
    monkeypatch.undo()
    assert 8 in steps and load(last)["global_step"] == 4  # epoch 1's, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    # the first write of a file: nothing is left, and nothing said to be kept
    from simfreeze.runs.resume import AtomicCheckpointIO

    failing_save(monkeypatch, lambda obj: True)
    with pytest.raises(ConfigError, match=r"^no space left on device writing \S+/new.ckpt$"):
        AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(4)}, tmp_path / "new" / "new.ckpt")
    assert list((tmp_path / "new").iterdir()) == []
