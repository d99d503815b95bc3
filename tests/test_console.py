"""The console's progress bar counts epochs as the epoch lines do."""

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from simfreeze.runs.progress import Bar


def test_the_bar_counts_epochs_from_one_out_of_max_epochs(capsys):
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[Bar()], accelerator="cpu")
    trainer.fit(BoringModel())
    shown = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "Epoch 0" not in shown
