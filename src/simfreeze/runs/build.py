"""Everything one fit needs, in three steps, so that a bad key or value fails before anything is
trained or decoded: ``resolve`` answers every question about the config once and runs the checks
(the run's ``RunPlan``); ``prepare_sources`` trains or reuses the models it starts from and embeds
with (the only step that trains another model); ``build_run`` constructs the datamodule's split, the
network with its initial weights, the module, the transfer set-up and the trainer with its callbacks."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from simfreeze.data.datamodule import TaskDataModule
from simfreeze.errors import ConfigError, WeightsError
from simfreeze.method.plan import FreezeSpec
from simfreeze.method.similarity import SimilarityTask
from simfreeze.networks.build import build_network
from simfreeze.networks.layers import LayerMap, family, layer_map
from simfreeze.runs.loggers import build_loggers
from simfreeze.runs.module import Classifier
from simfreeze.runs.preflight import claim_own_run_dir
from simfreeze.runs.progress import progress_bar
from simfreeze.runs.results import FitClock, final_dir
from simfreeze.runs.resume import (AtomicCheckpointIO, LastCheckpoint, RandomStateCallback, SameRunOnResume, check_resume,
                                   checkpoint_step)
from simfreeze.runs.sources import TrainFn, chain_stage, check_no_leakage, source_chain, source_weights
from simfreeze.runs.transfer import TransferSetup
from simfreeze.speed.precision import bf16_unsafe_convs, run_in_fp32, with_resolved_precision

log = logging.getLogger("simfreeze")


@dataclass
class Run:
    datamodule: TaskDataModule
    module: Classifier
    trainer: L.Trainer
    transfer: TransferSetup
    clock: FitClock
    best: ModelCheckpoint
    loggers: list          # the logger group's (simfreeze.runs.loggers)
    network: dict          # what build_network loaded (arch, weights, head, dropped head keys)
    source: dict | None    # the source stage's results, for a transfer from a source task
    fp32_convs: list[str]  # convolutions kept in fp32 under bf16 (simfreeze.speed.precision)


@dataclass(frozen=True)
class SimilarityPlan:
    """What S compares, checked before any model is trained (``plan_similarity``)."""
    source_classes: list[str]
    target_classes: list[str]
    images_from: list[dict]      # the data configs its images come from: the target's first
    extra: TaskDataModule | None  # the source task's images of source classes the target does not hold
    embedder_stage: dict | None   # the config whose source embeds (similarity.embedder=source.source…)
    embedder: nn.Module | None    # built from torchvision weights or a checkpoint (read now: a bad path fails
                                  # before any training); None: the model before fit, or a stage of the chain


@dataclass(frozen=True)
class RunPlan:
    """A run config resolved once into what its fit is made of, every check done, nothing trained
    and no image decoded: ``resolve`` → ``prepare_sources`` (the only step that trains another model)
    → ``build_run`` (construction only)."""
    cfg: dict                 # precision resolved: no longer "auto"
    run_dir: Path
    datamodule: TaskDataModule
    spec: FreezeSpec
    head: str                 # the network's head module
    layers: LayerMap | None   # None: an arch without a layer map and no freeze policy
    start: dict | None        # the config whose source the run starts from (transfer_from); None: model.weights
    similarity: SimilarityPlan | None
    chain: list[dict]         # the run configs of its source stages, nearest first (sources.source_chain), built once

    def stage_of(self, config: dict | None) -> dict | None:
        """The run config of ``config``'s source, a stage of the chain (``config`` is the run's or a stage's)."""
        if config is None or not config["source"]["task"]:
            return None
        return self.chain[0] if config is self.cfg else self.chain[self.chain.index(config) + 1]


@dataclass(frozen=True)
class Sources:
    """The trained (or cached) models a run starts from and embeds with."""
    weights: str | None       # the network's initial weights
    source: dict | None       # the source stage's results, for a transfer from a source task
    embedder: str | None      # the similarity embedder's weights, for a stage of the chain


def resolve(cfg: dict, run_dir: Path) -> RunPlan:
    """Every question about ``cfg`` answered once, and every check that can fail before training done:
    the precision, the freeze plan against the network's layer map, the chain stage to start from, the
    leakage check, what S compares."""
    cfg = with_resolved_precision(cfg)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    datamodule = TaskDataModule(**cfg["data"])
    spec = FreezeSpec.from_config(cfg["freeze"])
    arch = cfg["model"]["arch"]
    # Names only (layers, head) from a throw-away network: checked before any source is trained, with
    # the run's model.kwargs, so one the constructor refuses fails here too.
    probe, probe_record = build_network(arch, datamodule.num_classes, head_init=cfg["model"]["head_init"],
                                        **cfg["model"]["kwargs"])
    layers = None
    if spec.policy != "none" or family(arch) is not None:  # plan.json for every mapped arch
        layers = layer_map(probe, arch, spec.l_total)
        spec.check(len(layers))
    chain = source_chain(cfg)
    # transfer_from=source.source: from the source's own source (the base), skipping the source task
    start = chain_stage(cfg, cfg["transfer_from"], "transfer_from", chain) if cfg["transfer"] else None  # checked first
    if cfg["transfer"]:
        check_no_leakage(cfg, datamodule.plan_split(), lambda data: TaskDataModule(**data).plan_split(), chain)
    similarity = None
    if spec.needs_similarity or cfg["similarity"]["enabled"]:
        similarity = plan_similarity(cfg, datamodule, chain)
    return RunPlan(cfg, run_dir, datamodule, spec, probe_record["head"], layers, start, similarity, chain)


def prepare_sources(plan: RunPlan, train_source: TrainFn) -> Sources:
    """The models ``plan`` starts from and embeds with, each trained now with ``train_source(cfg, dir)``
    or taken from the cache (``simfreeze.runs.sources``): the only step of a fit that trains another model."""
    embedder = None
    if plan.similarity is not None and plan.similarity.embedder_stage is not None:
        stage = plan.similarity.embedder_stage
        embedder = source_weights(stage, train_source, plan.stage_of(stage))[0]
    if plan.start is None:
        return Sources(plan.cfg["model"]["weights"], None, embedder)
    weights, source = source_weights(plan.start, train_source, plan.stage_of(plan.start))
    return Sources(weights, source, embedder)


def build_run(plan: RunPlan, sources: Sources, callbacks: list = ()) -> Run:
    """The run ``plan`` describes, starting from ``sources``: construction only, nothing trained.
    ``callbacks`` go to the trainer after the run's own."""
    cfg, run_dir, datamodule, spec, layers = plan.cfg, plan.run_dir, plan.datamodule, plan.spec, plan.layers
    run_dir.mkdir(parents=True, exist_ok=True)
    similarity, similarity_data = None, []
    if plan.similarity is not None:
        similarity, similarity_data = similarity_task(cfg, datamodule, plan.similarity, plan.head, sources.embedder,
                                                      plan.stage_of(plan.similarity.embedder_stage))
    L.seed_everything(cfg["seed"], workers=True, verbose=False)  # the source run, if any, moved the RNG
    weights, source = sources.weights, sources.source
    weights_key = ("the cached source" if source else "source.weights") if cfg["transfer"] else "model.weights"
    try:
        net, network = build_network(cfg["model"]["arch"], datamodule.num_classes, weights, key=weights_key,
                                     head_init=cfg["model"]["head_init"], **cfg["model"]["kwargs"])
    except WeightsError as err:
        if source:  # the file is the cache's, not one the user named
            raise WeightsError(f"{err}; delete {source['run_dir']} to train the source again") from None
        raise
    if network["dropped_head_keys"]:
        log.info("initial weights %s: dropped head keys %s", weights, network["dropped_head_keys"])
    module = Classifier(net, datamodule.num_classes, optimizer=hydra.utils.instantiate(cfg["optimizer"]),
                        scheduler=hydra.utils.instantiate(cfg["scheduler"]) if cfg["scheduler"] else None,
                        label_smoothing=cfg["model"]["label_smoothing"], channels_last=cfg["model"]["channels_last"],
                        keep_frozen=cfg["checkpoint"]["keep_frozen"])
    files = datamodule.files_digest()
    resume_step = None
    if cfg["ckpt_path"]:  # every refusal before the loggers, split.json or checkpoints/ are touched
        from simfreeze.networks.build import load_checkpoint

        checkpoint = load_checkpoint(cfg["ckpt_path"], "ckpt_path", mmap=True)
        check_resume(checkpoint, cfg, module.state_dict(), files, cfg["ckpt_path"])
        resume_step = checkpoint_step(checkpoint)
        del checkpoint
    cache_budget = cfg["cache"]["budget_gb"] if cfg["cache"]["enabled"] and layers is not None else None
    transfer = TransferSetup(datamodule, spec, layers, similarity, cache_budget, out_dir=run_dir)
    clock = FitClock()
    # best.ckpt holds weights only (for testing and export); last.ckpt everything needed to resume,
    # every checkpoint.last_every_n_epochs epochs, at the end and when stopped. Neither holds the
    # frozen prefix unless checkpoint.keep_frozen (the module's hooks).
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc", mode="max",
                           save_weights_only=True)
    last = LastCheckpoint(run_dir / "checkpoints", every_n_epochs=cfg["checkpoint"]["last_every_n_epochs"],
                          staged=final_dir(run_dir) != run_dir)
    loggers = build_loggers(cfg, run_dir, resume_step)
    # The clock first: the fit time includes the transfer set-up (the similarity pass, the fill).
    # No DistributedSampler: with DDP the datamodule holds and serves each process's share itself.
    plugins = [*listed(cfg["trainer"].get("plugins")), AtomicCheckpointIO()]
    try:
        trainer = L.Trainer(**{"enable_model_summary": cfg["verbose"], **cfg["trainer"], "plugins": plugins},
                            default_root_dir=run_dir, logger=loggers or False, use_distributed_sampler=False,
                            callbacks=[clock, transfer, best, last, RandomStateCallback(), SameRunOnResume(cfg, files),
                                       progress_bar(cfg["progress"]), *callbacks])
    except (MisconfigurationException, ModuleNotFoundError, ValueError, TypeError) as err:
        # Lightning's own refusal of a trainer setting (an accelerator this machine lacks, a max_time it cannot read)
        raise ConfigError(f"trainer: Lightning refuses these settings: {' '.join(str(err).split())[:300]}") from None

    for data in (datamodule, *similarity_data):  # known from the trainer before DDP starts its processes
        data.set_shard(trainer.global_rank, trainer.world_size)
    datamodule.setup("fit")  # the last check: class sizes, unreadable images
    if trainer.is_global_zero:  # with DDP every process builds this; one writes the files
        claim_own_run_dir(run_dir, cfg["ckpt_path"])  # of two runs started on one directory, the second stops here
        datamodule.save_split(run_dir / "split.json")
    log.info("task %s: %s", datamodule.labels, datamodule.total_sizes)
    if trainer.world_size > 1:
        log.info("DDP process %d of %d holds %s", trainer.global_rank, trainer.world_size, datamodule.sizes)
    fp32_convs = []
    # The precision the trainer runs, not the one asked for: Lightning runs 16-mixed as bf16 on a CPU.
    if str(trainer.precision).startswith("bf16") and trainer.strategy.root_device.type == "cpu":
        fp32_convs = bf16_unsafe_convs(net, datamodule.prepare(datamodule.tensors["train"][0][:1]))
        run_in_fp32(net, fp32_convs)  # oneDNN's bf16 weight gradient is wrong for these (simfreeze.speed.precision)
        if fp32_convs:
            log.info("bf16: %d convolution(s) whose stride exceeds their input run in fp32: %s",
                     len(fp32_convs), ", ".join(fp32_convs))
    if cfg["model"]["compile"]:
        net.compile()  # in place: state-dict keys stay as they are (the cached suffix path runs eager)
    return Run(datamodule, module, trainer, transfer, clock, best, loggers, network, source, fp32_convs)


def listed(value) -> list:
    """``trainer.plugins`` (none, one or a list) as a list, to add the run's own to."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# Images per class for the centroids of the classes only the embedder knows (the centred cosine's mean).
REFERENCE_IMAGES = 200


def plan_similarity(cfg: dict, target: TaskDataModule, chain: list[dict]) -> SimilarityPlan:
    """What S compares for this run, checked before any model is trained: the source's classes
    (``similarity.source_classes``, or the source task's positive class or classes) against the
    target's, embedded by the model before fit (``similarity.embedder=source``), torchvision weights,
    a checkpoint, or a stage further up the chain of sources (``source.source``: the source's own
    source, e.g. a pretrained base)."""
    spec = cfg["similarity"]
    source_task = cfg["source"]["task"]
    if spec["source_classes"]:
        source_classes = list(spec["source_classes"])
    elif source_task:
        source_data = chain[0]["data"]
        source_classes = [source_data["positive"]] if source_data["positive"] else list(source_data["classes"])
    else:
        raise ConfigError("similarity.source_classes is needed when the source is not a task "
                          "(e.g. similarity.source_classes=[cat])")
    target_classes = list(spec["target_classes"] or ([target.positive] if target.positive else target.classes))
    if any(name not in target.classes for name in target_classes):
        raise ConfigError(f"similarity.target_classes={target_classes} must be among data.classes {target.classes}")

    extra, images_from = None, [cfg["data"]]  # images of source classes the target task does not hold come from the source task
    if any(name not in target.classes for name in source_classes):
        if not source_task:
            raise ConfigError(f"similarity.source_classes={source_classes} are not all in data.classes "
                              f"{target.classes}, and there is no source task to take their images from")
        images_from.append(chain[0]["data"])
        extra = TaskDataModule(**images_from[-1])
        unknown = [name for name in source_classes if name not in target.classes and name not in extra.classes]
        if unknown:  # found now, not after the source is trained
            raise ConfigError(f"similarity.source_classes: {unknown} are in neither the target's classes {target.classes} "
                              f"nor the source task's {extra.classes}")
    embedder_stage, embedder = None, None
    if spec["embedder"].startswith("source.source"):  # a stage further up the chain, e.g. the pretrained base
        embedder_stage = chain_stage(cfg, spec["embedder"], "similarity.embedder", chain)
    elif spec["embedder"] != "source":
        embedder, _ = build_network(cfg["model"]["arch"], 2, spec["embedder"], key="similarity.embedder",
                                    **cfg["model"]["kwargs"])
    return SimilarityPlan(source_classes, target_classes, images_from, extra, embedder_stage, embedder)


def similarity_task(cfg: dict, target: TaskDataModule, plan: SimilarityPlan, head: str,
                    stage_weights: str | None, embedder_cfg: dict | None) -> tuple[SimilarityTask, list[TaskDataModule]]:
    """The similarity pass ``plan`` describes, with the embedder's weights (``stage_weights``: the chain
    stage's, from ``prepare_sources``; ``embedder_cfg``: that stage's run config). Also returns the
    datamodules it takes images from besides ``target`` (to be sharded like it)."""
    spec = cfg["similarity"]
    source_classes, target_classes, extra = plan.source_classes, plan.target_classes, plan.extra
    images_from = list(plan.images_from)
    embedder, embedder_name, known = plan.embedder, spec["embedder"], None
    if plan.embedder_stage is not None:
        embedder_name = f"{embedder_name} ({stage_weights})"
        if spec["scores"] and plan.embedder_stage["source"]["task"]:  # the classes the embedder was trained to tell apart
            images_from.append(embedder_cfg["data"])
            known = TaskDataModule(**images_from[-1])
        embedder, _ = build_network(cfg["model"]["arch"], 2, stage_weights, key="similarity.embedder",
                                    **cfg["model"]["kwargs"])

    def class_images(name: str):
        if name in target.classes:
            return target.class_images(name)
        if extra is not None and name in extra.classes:
            return extra.class_images(name)
        return known.class_images(name)[:REFERENCE_IMAGES]  # a centroid to centre on, not a class to compare

    # The centred cosine's mean: every class the embedder knows (its own task's, when it is a stage of the
    # chain) and every class of both tasks, each weighing the same (at least three, or it is always −1).
    references = list(dict.fromkeys([*(known.classes if known else []), *target.classes,
                                     *(extra.classes if extra else [])]))
    # An embedder of its own: S is the same for every fit that embeds the same images with it (the rates of a setting).
    memo_key = None if embedder is None else hashlib.sha256(json.dumps(
        [spec, embedder_name, cfg["model"], images_from, cfg["trainer"]["precision"], cfg["trainer"]["devices"]],
        sort_keys=True, default=str).encode()).hexdigest()
    return SimilarityTask(class_images, target.prepare, source_classes, target_classes, head, embedder=embedder,
                          embedder_name=embedder_name, matrix=spec["matrix"], batch_size=target.eval_batch_size,
                          scores=spec["scores"], reference_classes=references, memo_key=memo_key), \
        [d for d in (extra, known) if d]

