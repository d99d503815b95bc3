"""A resume continues its run or changes nothing (README, "What a run leaves"): a failed checkpoint
write keeps the previous one."""

import errno
import os

import pytest
import torch

from simfreeze.errors import ConfigError
from tests.test_checkpoints import fit, load

# 2 classes × 16 training images, batches of 8: 4 steps an epoch, 2 epochs, last.ckpt after each.
TWO_EPOCHS = ["trainer.max_epochs=2", "checkpoint.last_every_n_epochs=1", "trainer.log_every_n_steps=1"]


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
