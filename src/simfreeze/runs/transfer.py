"""The transfer set-up of a run: one callback that, before fit, hands each step's value to the next.

In ``setup("fit")``, before the optimizer exists and on the device training will use:

1. ``S``: the similarity pass (``simfreeze.method.similarity``), when the plan needs S or
   ``similarity.enabled``; it also keeps the outputs of the deepest prefixes the plan can reach.
2. ``l_freeze``: the plan (``FreezeSpec.l_freeze``) from S.
3. the freeze (``simfreeze.method.freeze``): ``requires_grad`` per layer, ``plan.json``.
4. the frozen-prefix cache (``simfreeze.speed.prefix``), filled from the outputs step 1 kept where
   it can; the datamodule then serves the cached outputs and the module runs the remaining units.

Frozen BatchNorm is held in eval before every training step (Lightning puts the whole module in
train mode at the start of fit and of every epoch). After a restore from ``ckpt_path`` the cache
is checked against the restored prefix weights and refilled if they differ.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import torch

from simfreeze.errors import ConfigError
from simfreeze.method.freeze import freeze_leading, frozen_parameter_ids, hold_eval, plan_markdown, plan_record, plan_rows
from simfreeze.method.plan import FreezeSpec
from simfreeze.method.similarity import Similarity, SimilarityTask, image_batches, measure_similarity, pooled_features
from simfreeze.method.transferability import logme
from simfreeze.networks.layers import LayerMap
from simfreeze.networks.units import sequential_units
from simfreeze.speed.distributed import gather_rows
from simfreeze.speed.prefix import PrefixCache, deepest_prefixes, fill_prefix_cache, frozen_prefix_length, prefix_cache_key

log = logging.getLogger(__name__)


# The last prefix-cache fill of this process, by its key: the next fit of the same frozen prefix on the
# same images (another rate of an lr_search job, another seed of a depth) takes its outputs.
LAST_FILL: dict = {}
# The last similarity pass of this process with an embedder of its own, by ``SimilarityTask.memo_key``:
# the next fit of the same setting at another learning rate takes its record.
LAST_SIMILARITY: dict = {}


class TransferSetup(L.Callback):
    """S → plan → freeze → prefix cache (see the module's docstring).

    ``layers`` None: the network has no layer map (nothing is frozen or cached); ``similarity``
    None: no S; ``cache_budget_gb`` None: no frozen-prefix cache.
    """

    def __init__(self, datamodule, spec: FreezeSpec, layers: LayerMap | None, similarity: SimilarityTask | None = None,
                 cache_budget_gb: float | None = None, out_dir: Path | None = None):
        if layers is not None:
            spec.check(len(layers))
        self.datamodule, self.spec, self.layers, self.similarity_task = datamodule, spec, layers, similarity
        self.cache_budget_bytes = None if cache_budget_gb is None else cache_budget_gb * 2**30
        self.out_dir = out_dir
        self.similarity: Similarity | None = None
        self.similarity_remembered = False
        self.l_freeze: int | None = None
        self.cache: PrefixCache | None = None
        self.cache_record: dict | None = None
        self._norms: list[torch.nn.Module] = []
        self._done = False

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self._done:
            return
        self._done = True
        net, device = pl_module.net, trainer.strategy.root_device  # setup runs before the strategy moves the model
        # bf16-true / 16-true: the passes below run the network in the dtype training will (Lightning
        # converts the module only after this hook; converting twice is a no-op).
        trainer.precision_plugin.convert_module(pl_module)
        autocast = trainer.precision_plugin.forward_context
        writes = trainer.is_global_zero and self.out_dir is not None
        units = sequential_units(net) if self.layers is not None and self.cache_budget_bytes is not None else None

        if self.similarity_task is not None:
            task = self.similarity_task
            gather = partial(gather_rows, strategy=trainer.strategy)  # with DDP: every process's share
            if trainer.world_size > 1:
                task = replace(task, gather=gather)
            keep = {}
            if units and task.embedder is None:  # the pass runs the prefix the cache needs
                plans = [frozen_parameter_ids(net, self.layers, n) for n in self.spec.reachable(len(self.layers), self.layers.l_total)]
                keep = {k: units[k - 1][1] for k in deepest_prefixes(units, plans)}
            remembered = LAST_SIMILARITY.get(task.memo_key) if task.memo_key and not keep else None
            if remembered is not None:
                self.similarity = Similarity(copy.deepcopy(remembered), seconds=0.0)
                log.info("similarity: S=%.4f remembered from this process's previous pass on the same images",
                         self.similarity.score)
            else:
                self.similarity = self.measure(trainer, task, net, device, keep, autocast, gather)
                LAST_SIMILARITY.clear()
                if task.memo_key and not keep:
                    LAST_SIMILARITY[task.memo_key] = copy.deepcopy(self.similarity.record)
            self.similarity_remembered = remembered is not None
            if writes:
                (self.out_dir / "similarity.json").write_text(json.dumps(self.similarity.record, indent=1))

        if self.layers is None:
            return
        score = self.similarity.score if self.similarity else None
        self.l_freeze = trainer.strategy.broadcast(self.spec.l_freeze(len(self.layers), self.layers.l_total, score), src=0)
        self._norms = freeze_leading(net, self.layers, self.l_freeze)
        rows = plan_rows(net, self.layers, self.l_freeze)
        if writes:
            (self.out_dir / "plan.json").write_text(json.dumps(plan_record(self.spec, self.layers, rows, self.l_freeze, score), indent=1))
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("freeze/plan", plan_markdown(self.spec, self.layers, rows, self.l_freeze), 0)

        if self.cache_budget_bytes is None:
            return
        if units is None:
            self.cache_record = {"used": False, "reason": f"{type(net).__name__} is not a chain of units"}
            return
        captured = self.similarity.captured if self.similarity else {}
        reused = kept_outputs(captured, frozen_prefix_length(units), list(self.datamodule.split.train))
        if reused is not None and len(reused) != len(self.datamodule.tensors["train"][1]):
            reused = None  # a DDP share padded with repeated images: the fill runs them all
        pl_module.to(device)
        self.cache, self.cache_record = fill_prefix_cache(
            units, self.datamodule, device, autocast, str(trainer.precision), self.cache_budget_bytes,
            self.datamodule.eval_batch_size, trainer.max_epochs, reused, memo=LAST_FILL)
        if self.similarity:
            self.similarity.captured = {}  # used or not: free them
        if self.cache is not None:
            self.datamodule.use_features(self.cache.features)
            pl_module.suffix = self.cache.suffix

    def measure(self, trainer, task, net, device, keep, autocast, gather) -> Similarity:
        """The similarity pass, and LogME with ``task.scores``; one record on every process."""
        embedder = (task.embedder or net).to(device)
        # Under the run's precision, as the fill and training run; centroids and cosine stay fp32 / fp64.
        with autocast():
            similarity = measure_similarity(task, embedder, device, keep,
                                            (self.cache_budget_bytes or 0) / 2)  # the cache needs room too
            if task.scores:  # LogME of the embedder's features (every score of a pair from the network S
                # comes from) on the target's training images
                train_images, train_labels = self.datamodule.own("train")
                batches = image_batches(train_images, self.datamodule.prepare, self.datamodule.eval_batch_size, device)
                features = pooled_features(embedder, task.head, batches)
        if task.scores:  # in float64, outside autocast
            similarity.record["scores"]["logme"] = logme(gather(features), gather(train_labels))
        # One S (and so one plan) on every process: rank 0's, not trusted to agree by determinism.
        similarity.record = trainer.strategy.broadcast(similarity.record, src=0)
        return similarity

    def on_fit_start(self, trainer, pl_module):
        """A checkpoint restored after setup (``ckpt_path``) could bring other prefix weights: the
        key says whether the cached outputs still hold; if not, they are recomputed in place."""
        if self.cache is None or trainer.ckpt_path is None:
            return  # nothing was restored since the fill: skip the digest
        key = prefix_cache_key(self.cache.prefix, self.datamodule, str(trainer.precision),
                               self.cache_record["reused_similarity_pass"])
        if key != self.cache.key:
            log.warning("prefix cache: the frozen prefix changed after the fill (restored checkpoint?); refilling")
            LAST_FILL.clear()  # the outputs it holds are refilled in place below
            for stage, fresh in self.cache.refill().items():
                self.cache.features[stage].copy_(fresh)
            self.cache.key = self.cache_record["key"] = key

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        hold_eval(self._norms)

    def state_dict(self) -> dict:
        return {"l_freeze": self.l_freeze}

    def load_state_dict(self, state_dict: dict) -> None:
        restored = state_dict.get("l_freeze")
        if restored is not None and self.l_freeze is not None and restored != self.l_freeze:
            raise ConfigError(f"the checkpoint was trained with L_freeze={restored} but this run's plan gives "
                              f"{self.l_freeze} (other source weights or freeze settings?)")

    def record(self) -> dict:
        """What ``results.json`` records of the set-up."""
        scores = None if self.similarity is None else self.similarity.record.get("scores")
        return {"S": None if self.similarity is None else round(self.similarity.score, 6),
                "scores": None if scores is None else {k: v for k, v in scores.items() if k != "centred_over"},
                "l_total": None if self.layers is None else self.layers.l_total,
                "similarity_seconds": None if self.similarity is None else round(self.similarity.seconds, 3),
                "similarity_remembered": self.similarity_remembered,
                "l_freeze": self.l_freeze or 0, "n_layers": None if self.layers is None else len(self.layers),
                "prefix_cache": self.cache_record}


def kept_outputs(captured: dict[str, dict[int, torch.Tensor]], k: int, classes: list[str]) -> torch.Tensor | None:
    """The training images' outputs of prefix ``k`` in the task's class order, when a pass kept
    them for every class; else None."""
    if k == 0 or not all(k in captured.get(name, {}) for name in classes):
        return None
    return torch.cat([captured[name][k] for name in classes]).contiguous()
