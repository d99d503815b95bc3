"""`python -m train [overrides]`: seed → build → fit → test → write results.

Examples::

    python -m train                                   # cat vs dog, ResNet-50, 3 epochs
    python -m train data.per_class=100 trainer.max_epochs=1
    python -m train --cfg job                         # print the composed config
    python -m train +experiment=<name>                # conf/experiment/<name>.yaml
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from simfreeze.config import ConfigError, validate_config

OmegaConf.register_new_resolver("join", lambda items: "-".join(map(str, items)), replace=True)
log = logging.getLogger("simfreeze")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from simfreeze.data import TaskDataModule
    from simfreeze.model import Classifier, build_network, count_parameters
    from simfreeze.progress import progress_bar
    from simfreeze.report import FitClock, device_name, git_revision, library_versions, summary_line, write_results

    # Build everything first: a bad key or value fails here, before any data is read.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = TaskDataModule(**cfg.data)
    net, weights_record = build_network(cfg.model.arch, datamodule.num_classes, cfg.model.weights,
                                        **cfg.model.kwargs)
    if weights_record["dropped_head_keys"]:
        log.info("initial weights %s: dropped head keys %s", cfg.model.weights, weights_record["dropped_head_keys"])
    module = Classifier(net, datamodule.num_classes,
                        optimizer=hydra.utils.instantiate(cfg.optimizer),
                        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.scheduler else None,
                        label_smoothing=cfg.model.label_smoothing, channels_last=cfg.model.channels_last)
    clock = FitClock()
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc",
                                 mode="max", save_last=True)
    trainer = L.Trainer(**cfg.trainer, default_root_dir=run_dir,
                        logger=TensorBoardLogger(run_dir, name="tensorboard", version=""),
                        callbacks=[checkpoint, clock, progress_bar(cfg.progress)])

    datamodule.setup("fit")
    datamodule.save_split(run_dir / "split.json")
    log.info("task %s: %s", datamodule.labels, datamodule.sizes)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    final = trainer.callback_metrics.get("val/acc")  # read before testing replaces the metrics

    test_acc = None
    if cfg.test and "test" in datamodule.tensors:
        ckpt = "best" if checkpoint.best_model_path else None
        test_acc = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]["test/acc"]

    trainable, total = count_parameters(module.net)
    best = checkpoint.best_model_score
    results = {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "best_val_acc": None if best is None else round(float(best), 6),
        "final_val_acc": None if final is None else round(float(final), 6),
        "test_acc": None if test_acc is None else round(float(test_acc), 6),
        **clock.summary(),
        "epochs": trainer.current_epoch,
        "images": datamodule.sizes,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seed": cfg.seed,
        "split_seed": cfg.data.seed,
        "precision": str(trainer.precision),
        "device": device_name(trainer),
        "weights": weights_record,
        "versions": library_versions(),
        "git_revision": git_revision(),
        "command": " ".join(sys.argv),
    }
    write_results(run_dir / "results.json", results)
    print(summary_line(results), flush=True)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate_config(cfg)
        results = train(cfg, run_dir)
    except ConfigError as err:
        # One clear line instead of a traceback: the message names the key and what is allowed.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["best_val_acc"]  # the objective for Hydra sweepers


if __name__ == "__main__":
    main()
