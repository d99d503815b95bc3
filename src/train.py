"""`python -m train [overrides]`: seed → build → fit → test → write results.

Examples::

    python -m train                                   # cat vs dog from scratch, ResNet-50, 3 epochs
    python -m train +experiment=cat_to_dog            # the paper's protocol: every arm, one summary
    python -m train arm=dynamic data.positive=dog +source.task.positive=cat
    python -m train --cfg job                         # print the composed config
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from simfreeze.config import ConfigError, validate_config
from simfreeze.preflight import RunDirInUse

log = logging.getLogger("simfreeze")
# conf/hydra/launcher/local_queue.yaml: submitit hides every GPU from a job unless told how many to show.
OmegaConf.register_new_resolver("cuda_count", lambda: __import__("torch").cuda.device_count(), replace=True)


def run_name(cfg: dict) -> str:
    data = cfg["data"]
    return cfg["name"] or f"{cfg['arm']}:{data['positive'] or '-'.join(data['classes'])}"


def source_run_config(cfg: dict) -> dict:
    """The config that trains the source task: the target's recipe on the source task's data.

    A source may have a source of its own (``source.source``: a chain of stages, seed 004); it then
    trains from that one with ``source.freeze``, and so on up the chain. Each stage is cached.
    """
    from simfreeze.precision import resolve_precision

    spec = cfg["source"]
    source = copy.deepcopy(cfg)
    if "classes" in spec["task"]:  # a task of its own classes: the target's labelling does not carry over
        source["data"].update(positive=None, groups={})
    source["data"].update(spec["task"])
    inner = spec.get("source")  # the source's own source, if this stage transfers too
    source.update(arm="source", name=None, transfer=bool(inner), source_only=False, ckpt_path=None)
    source["freeze"].update(policy="none", depth=None)
    if inner:
        source["freeze"].update(spec.get("freeze") or {})
    source["similarity"].update(enabled=False, analysis=False)
    source["source"] = {"task": None, "weights": None, "freeze": None, "source": None, **(inner or {}),
                        "cache_dir": spec["cache_dir"]}
    # The precision that runs, not "auto": it is part of the source's cache key.
    source["trainer"]["precision"] = resolve_precision(cfg["trainer"]["precision"], cfg["trainer"]["accelerator"])
    # One device: a multi-device source started inside a DDP target run would relaunch the whole
    # command, whose processes would then wait on the source's lock held by their own parent.
    source["trainer"].update(devices=1, num_nodes=1, strategy="auto")
    return source


def source_chain(cfg: dict) -> list[dict]:
    """The run configs of the source stages, nearest first (empty for a run without a source task)."""
    chain = []
    while cfg["source"]["task"]:
        cfg = source_run_config(cfg)
        chain.append(cfg)
    return chain


def resolve_source(cfg: dict) -> tuple[str | None, dict | None]:
    """Initial weights of a transfer run (a file or enum name) and, for a source task, its results."""
    from simfreeze.sources import cached_source

    if cfg["source"]["task"]:
        source_cfg = source_run_config(cfg)
        directory, results, trained = cached_source(
            Path(cfg["source"]["cache_dir"]), run_name(source_cfg).replace(":", "-"), source_cfg, train)
        log.info("source %s %s: %s", results["name"], "trained" if trained else "reused from cache", directory)
        results = {**results, "cached": not trained}
        # The last checkpoint, not the best one: the best is chosen on val images, which may be
        # the target's val images too (the paper's shared cat/dog split).
        return str(directory / "checkpoints" / "last.ckpt"), results
    if cfg["source"]["weights"]:
        return cfg["source"]["weights"], None
    raise ConfigError("a transfer run needs source.task (e.g. +source.task.positive=cat) or source.weights (e.g. source.weights=IMAGENET1K_V2)")


def check_resume_path(ckpt_path: str | None) -> None:
    """A resume checkpoint that is not there fails now, not after the similarity pass and the fill."""
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path='{ckpt_path}': no such checkpoint file (resume from <run dir>/checkpoints/last.ckpt)")


def check_no_leakage(cfg: dict, target) -> None:
    """No source stage may have trained on an image the target validates on."""
    from simfreeze.data import TaskDataModule, shared_images

    for stage, source_cfg in enumerate(source_chain(cfg), 1):
        source_data = source_cfg["data"]
        if (source_data["root"], source_data["dataset"]) != (cfg["data"]["root"], cfg["data"]["dataset"]):
            continue  # different data: nothing to share
        overlap = shared_images(TaskDataModule(**source_data).plan_split(), target.plan_split())
        if overlap:
            counts = {name: len(idx) for name, idx in overlap.items()}
            where = "the source task" if stage == 1 else f"source stage {stage} (source.{'source.' * (stage - 1)}task)"
            raise ConfigError(f"{where} trains on {counts} images of the target's validation split; "
                              f"use the same data.seed/per_class/val_fraction for both, or disjoint classes")


def build_similarity(cfg: dict, target, head: str, run_dir: Path):
    from simfreeze.data import TaskDataModule
    from simfreeze.model import build_network
    from simfreeze.similarity import SimilarityCallback

    spec = cfg["similarity"]
    source_task = cfg["source"]["task"]
    if spec["source_classes"]:
        source_classes = list(spec["source_classes"])
    elif source_task:
        source_data = source_run_config(cfg)["data"]
        source_classes = [source_data["positive"]] if source_data["positive"] else list(source_data["classes"])
    else:
        raise ConfigError("similarity.source_classes is needed when the source is not a task "
                          "(e.g. similarity.source_classes=[cat])")
    target_classes = list(spec["target_classes"] or ([target.positive] if target.positive else target.classes))
    if any(name not in target.classes for name in target_classes):
        raise ConfigError(f"similarity.target_classes={target_classes} must be among data.classes {target.classes}")

    extra = None  # images of source classes the target task does not hold come from the source task
    if any(name not in target.classes for name in source_classes):
        if not source_task:
            raise ConfigError(f"similarity.source_classes={source_classes} are not all in data.classes "
                              f"{target.classes}, and there is no source task to take their images from")
        extra = TaskDataModule(**source_run_config(cfg)["data"])

    def class_images(name: str):
        return (target if name in target.classes else extra).class_images(name)

    embedder, embedder_name = None, spec["embedder"]
    if embedder_name != "source":
        embedder, _ = build_network(cfg["model"]["arch"], 2, embedder_name, key="similarity.embedder",
                                    **cfg["model"]["kwargs"])
    return SimilarityCallback(class_images, target.prepare, source_classes, target_classes, head,
                              embedder=embedder, embedder_name=embedder_name, matrix=spec["matrix"],
                              batch_size=target.eval_batch_size, out_dir=run_dir)


def train(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from simfreeze.data import TaskDataModule
    from simfreeze.freeze import NEEDS_SIMILARITY, FreezeCallback, depth_plan, validate_policy
    from simfreeze.layers import family, layer_map
    from simfreeze.model import Classifier, build_network, count_parameters
    from simfreeze.precision import bf16_unsafe_convs, device_type, resolve_precision, run_in_fp32
    from simfreeze.preflight import claim_run_dir
    from simfreeze.prefix import PrefixCacheCallback
    from simfreeze.progress import progress_bar
    from simfreeze.report import FitClock, run_results, summary_line, write_results
    from simfreeze.resume import RandomStateCallback

    # precision=auto → this device type's measured default (simfreeze.precision), as results record it.
    trainer_cfg = cfg["trainer"]
    cfg = {**cfg, "trainer": {**trainer_cfg, "precision": resolve_precision(trainer_cfg["precision"],
                                                                            trainer_cfg["accelerator"])}}
    if cfg["freeze"]["depth"] is not None:
        cfg = {**cfg, "freeze": {**cfg["freeze"], **depth_plan(cfg["freeze"]["depth"])}}
    check_resume_path(cfg["ckpt_path"])
    if cfg["similarity"]["analysis"]:  # no training: embed every class, write the paper's figures
        return run_analysis(cfg, run_dir, overrides)
    if cfg["source_only"]:  # the source arm: train (or reuse) the source task and report it
        _, source_results = resolve_source(cfg)
        results = {**source_results, "arm": "source", "run_dir": str(run_dir), "source_dir": source_results["run_dir"],
                   "overrides": list(overrides)}
        write_results(run_dir / "results.json", results)
        print(summary_line(results), flush=True)
        return results

    # Build everything first: a bad key or value fails here, before any image is decoded.
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    datamodule = TaskDataModule(**cfg["data"])
    freeze = cfg["freeze"]
    policy = freeze["policy"]
    arch = cfg["model"]["arch"]
    # Names only (layers, head) from a throw-away network: checked before any source is trained.
    probe, probe_record = build_network(arch, datamodule.num_classes, head_init=cfg["model"]["head_init"])
    layers = None
    if policy != "none" or family(arch) is not None:  # plan.json for every mapped arch
        layers = layer_map(probe, arch, freeze["l_total"])
        validate_policy(policy, len(layers), freeze["k"], freeze["low"], freeze["high"], freeze["fallback"])
    similarity = None
    if policy in NEEDS_SIMILARITY or cfg["similarity"]["enabled"]:
        similarity = build_similarity(cfg, datamodule, probe_record["head"], run_dir)
    if cfg["transfer"]:
        check_no_leakage(cfg, datamodule)
    weights, source_results = resolve_source(cfg) if cfg["transfer"] else (cfg["model"]["weights"], None)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)  # the source run, if any, moved the RNG
    weights_key = "source.weights" if cfg["transfer"] and not cfg["source"]["task"] else "model.weights"
    net, weights_record = build_network(arch, datamodule.num_classes, weights, key=weights_key,
                                        head_init=cfg["model"]["head_init"], **cfg["model"]["kwargs"])
    if weights_record["dropped_head_keys"]:
        log.info("initial weights %s: dropped head keys %s", weights, weights_record["dropped_head_keys"])
    module = Classifier(net, datamodule.num_classes,
                        optimizer=hydra.utils.instantiate(cfg["optimizer"]),
                        scheduler=hydra.utils.instantiate(cfg["scheduler"]) if cfg["scheduler"] else None,
                        label_smoothing=cfg["model"]["label_smoothing"], channels_last=cfg["model"]["channels_last"])

    callbacks: list[L.Callback] = [similarity] if similarity else []
    freezer = None
    if layers is not None:
        freezer = FreezeCallback(layers, policy, freeze["k"], freeze["low"], freeze["high"], freeze["fallback"],
                                 similarity=similarity, out_dir=run_dir)
        callbacks.append(freezer)
    cache = None
    if cfg["cache"]["enabled"] and freezer is not None:
        cache = PrefixCacheCallback(datamodule, cfg["cache"]["budget_gb"], batch_size=datamodule.eval_batch_size,
                                    similarity=similarity)
        if similarity is not None:  # share the similarity pass with the cache fill
            cache.request_captures(net, [freezer.frozen_parameter_ids(net, depth)
                                         for depth in range(layers.l_total + 1)])
        callbacks.append(cache)
    clock = FitClock()
    # best.ckpt holds weights only (for testing and export); last.ckpt everything needed to resume.
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc",
                                 mode="max", save_weights_only=True)
    # Written at every epoch end (save_last alone writes last.ckpt only when another checkpoint is
    # saved in that step, so a killed run would have nothing to resume from).
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, enable_version_counter=False)
    logger = TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(**cfg["trainer"], default_root_dir=run_dir, logger=logger,
                        callbacks=[clock, *callbacks, checkpoint, last, RandomStateCallback(),
                                   progress_bar(cfg["progress"])])

    datamodule.setup("fit")  # the last check: class sizes, unreadable images
    if trainer.is_global_zero:  # with DDP every process runs this function; one writes the files
        claim_run_dir(run_dir, cfg["ckpt_path"])  # of two runs started on one directory, the second stops here
        datamodule.save_split(run_dir / "split.json")
    log.info("task %s: %s", datamodule.labels, datamodule.sizes)
    fp32_convs = []
    if str(cfg["trainer"]["precision"]).startswith("bf16") and device_type(cfg["trainer"]["accelerator"]) == "cpu":
        fp32_convs = bf16_unsafe_convs(net, datamodule.prepare(datamodule.tensors["train"][0][:1]))
        run_in_fp32(net, fp32_convs)  # oneDNN's bf16 weight gradient is wrong for these (simfreeze.precision)
        if fp32_convs:
            log.info("bf16: %d convolution(s) whose stride exceeds their input run in fp32: %s",
                     len(fp32_convs), ", ".join(fp32_convs))
    if cfg["model"]["compile"]:
        net.compile()  # in place: state-dict keys stay as they are (the cached suffix path runs eager)

    # weights_only: a checkpoint (ours hold tensors and primitives only) can never run code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg["ckpt_path"], weights_only=True)
    final = trainer.callback_metrics.get("val/acc")  # read before testing replaces the metrics

    test_acc = None
    if cfg["test"] and "test" in datamodule.tensors:
        ckpt = "best" if checkpoint.best_model_path else None
        test_acc = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False,
                                weights_only=True)[0]["test/acc"]

    trainable, total = count_parameters(module.net)
    results = run_results(
        cfg, run_name(cfg), run_dir, trainer, clock, checkpoint.best_model_score, final, test_acc,
        images=datamodule.sizes, trainable=trainable, total=total, weights=weights_record,
        similarity=similarity.score if similarity else None,
        l_freeze=freezer.n_frozen if freezer else 0, n_layers=len(freezer.layers) if freezer else None,
        source=source_results, similarity_seconds=similarity.seconds if similarity else None,
        prefix_cache=cache.record if cache else None, overrides=list(overrides),
        precision_phases=precision_phases(trainer, similarity, cache, fp32_convs))
    logger.log_hyperparams(
        {"arm": cfg["arm"], "policy": policy, "S": results["S"] if results["S"] is not None else -1.0,
         "L_freeze": results["l_freeze"], "seed": cfg["seed"], "task": results["name"]},
        {"hp/best_val_acc": results["best_val_acc"] or 0.0, "hp/fit_seconds": results["fit_seconds"]})
    (run_dir / "tensorboard" / "hparams.yaml").unlink(missing_ok=True)  # fit wrote it before S was known
    logger.save()
    if trainer.is_global_zero:
        write_results(run_dir / "results.json", results)
        print(summary_line(results), flush=True)
    return results


def precision_phases(trainer, similarity, cache, fp32_convs: list[str]) -> dict:
    """The precision each phase of the fit ran in (None: the phase did not run)."""
    ran = str(trainer.precision)
    return {"similarity": ran if similarity else None,
            "cache_fill": ran if cache and cache.record.get("used") else None,
            "training": ran, "fp32_convs": fp32_convs}


def run_analysis(cfg: dict, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    from simfreeze.analysis import analysis_line, analyze
    from simfreeze.report import write_results

    embedder = cfg["similarity"]["embedder"]
    if embedder == "source":  # the source model: a source task (trained once, cached) or source.weights
        weights, _ = resolve_source(cfg)
    else:
        weights = embedder  # a torchvision weights enum or a checkpoint path
    results = {**analyze(cfg, run_dir, weights, str(weights if embedder == "source" else embedder)),
               "overrides": list(overrides)}
    write_results(run_dir / "results.json", results)
    print(analysis_line(results), flush=True)
    return results


def quiet_lightning() -> None:
    """Route Lightning's messages through Hydra's log handlers only (console + train.log), once."""
    import lightning  # noqa: F401  (its import installs the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Frozen BatchNorm is held in eval on purpose (see simfreeze.freeze).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate_config(cfg)
        quiet_lightning()
        run_cfg = OmegaConf.to_container(cfg, resolve=True)
        with job_devices(run_cfg, hydra_cfg, multirun):
            results = train(run_cfg, run_dir, overrides)
    except Exception as err:
        if not multirun:
            if isinstance(err, ConfigError):
                # One clear line instead of a traceback: the message names the key and what is allowed.
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise
        # One failed job must not stop the sweep: record it where the summary finds it, go on.
        from simfreeze.report import failed_results, write_results

        log.error("job %s failed", hydra_cfg.job.num, exc_info=not isinstance(err, ConfigError))
        print(f"error: job {hydra_cfg.job.num} ({' '.join(overrides)}): {err}", file=sys.stderr)
        if isinstance(err, RunDirInUse):
            return None  # that directory's results.json belongs to the other run
        raw = OmegaConf.to_container(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_results(run_dir / "results.json", failed_results(raw, run_name(raw), run_dir, err, overrides))
        return None
    return results.get("best_val_acc")  # the objective for Hydra sweepers


@contextlib.contextmanager
def job_devices(run_cfg: dict, hydra_cfg, multirun: bool):
    """Pin a sweep job that asked for ``devices=auto`` to one GPU of its own (simfreeze.placement)."""
    import torch

    from simfreeze.placement import claim_gpu, wants_one_gpu

    trainer = run_cfg["trainer"]
    n_cuda = torch.cuda.device_count()
    if not wants_one_gpu(trainer["devices"], trainer["accelerator"], multirun, n_cuda):
        yield
        return
    with claim_gpu(Path(hydra_cfg.sweep.dir) / ".gpu-locks", n_cuda, first=hydra_cfg.job.num) as index:
        log.info("job %s runs on cuda:%d", hydra_cfg.job.num, index)
        trainer.update(devices=[index], accelerator="gpu")
        yield


def cli() -> None:
    """``python -m train``: Hydra's composition errors (an unknown group option or key, override
    syntax) end like ours, with one ``error:`` line and exit status 2, instead of Hydra's report."""
    from hydra.errors import CompactHydraException

    from simfreeze.preflight import hydra_error_line

    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full report
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach this function
    try:
        main()
    except CompactHydraException as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
