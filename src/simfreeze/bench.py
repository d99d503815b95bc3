"""`python -m simfreeze.bench`: fit times of the arms side by side, in one process and one sitting.

Runs the paper protocol (ResNet-50, 1,280 train / 320 val, 3 epochs, the default recipe) for
scratch, dynamic transfer (the paper's 37 frozen layers), static 45 and head_only — with and
without the frozen-prefix cache — plus a plain PyTorch loop doing the same scratch training, and
reports medians over repetitions, ratios to scratch, and training FLOP/s against the measured
matrix-multiply peak of this machine. Fit time of a transfer arm includes its similarity pass
and its cache fill. The cat source model is trained once beforehand (not timed).

Beside each time ratio it prints the arm's *work* ratio: the floating-point operations its fit
needs (counted with torch's FlopCounterMode) over those of scratch. Time cannot fall below that
share unless the hardware runs the smaller layers faster; the two columns together say how much
of what freezing allows the implementation gets. It also times a few scratch training steps per
precision and memory format, the measurement behind ``trainer.precision=auto``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simfreeze.precision import device_type, native_cpu_bf16, resolve_precision

CONF = Path(__file__).resolve().parents[2] / "conf"

ARMS = {  # name → overrides on top of +experiment=cat_to_dog
    "scratch": ["arm=scratch"],
    "dynamic37": ["arm=static45", "freeze.k=37", "similarity.enabled=true"],
    "static45": ["arm=static45"],
    "head_only": ["arm=head_only"],
}


def compose_run(overrides: list[str]) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=cat_to_dog", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("hydra", None)
    return cfg


def matmul_peak_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best observed GEMM FLOP/s on this device (CPU here)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def autocast(precision: str, device: torch.device):
    """The autocast context Lightning's ``precision`` runs the forward pass under."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bench_device(cfg: dict) -> torch.device:
    return torch.device("cuda" if device_type(cfg["trainer"]["accelerator"]) == "cuda" else "cpu")


def scratch_network(cfg: dict, num_classes: int, channels_last: bool):
    """The arm's network from random init on the bench device, in the memory format asked for."""
    from simfreeze.model import build_network

    net, _ = build_network(cfg["model"]["arch"], num_classes, None, **cfg["model"]["kwargs"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = bench_device(cfg)
    return net.to(device, memory_format=memory_format), device, memory_format


def plain_loop_seconds(cfg: dict) -> float:
    """The scratch arm's training as a bare PyTorch loop: same model, data, batches, precision,
    memory format, optimizer, schedule and epochs, with validation each epoch; no Lightning."""
    import hydra

    from simfreeze.data import TaskDataModule, prepare_batch

    torch.manual_seed(cfg["seed"])
    dm = TaskDataModule(**cfg["data"])
    dm.setup()
    net, device, memory_format = scratch_network(cfg, dm.num_classes, cfg["model"]["channels_last"])
    precision = resolve_precision(cfg["trainer"]["precision"], cfg["trainer"]["accelerator"])
    (x_train, y_train), (x_val, y_val) = [(x.to(device), y.to(device)) for x, y in (dm.tensors["train"], dm.tensors["val"])]
    mean, std = dm.mean.to(device), dm.std.to(device)
    batch, epochs = dm.batch_size, cfg["trainer"]["max_epochs"]
    steps = epochs * -(-len(y_train) // batch)
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    scheduler = hydra.utils.instantiate(cfg["scheduler"])(optimizer, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg["model"]["label_smoothing"])

    def prepare(images, flip=False):
        x = prepare_batch(images, mean, std, dm.image_size, flip=flip)
        return x.contiguous(memory_format=memory_format)

    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for index in torch.randperm(len(y_train), device=device).split(batch):
            with autocast(precision, device):
                loss = loss_fn(net(prepare(x_train[index], dm.flip)), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        with torch.no_grad(), autocast(precision, device):
            for i in range(0, len(y_val), dm.eval_batch_size):
                net(prepare(x_val[i:i + dm.eval_batch_size]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def training_step_rate(cfg: dict, precision: str, channels_last: bool, steps: int = 6,
                       within_s: float = 20.0) -> float:
    """Images/s of scratch training steps (the arm's model, batch and optimizer, random images)
    under a precision and memory format: the median step after one warm-up step, over at most
    ``steps`` steps or ``within_s`` seconds (emulated bf16 can be very slow)."""
    import hydra

    torch.manual_seed(0)
    net, device, memory_format = scratch_network(cfg, 2, channels_last)
    net.train()
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    size, batch = cfg["data"]["image_size"] or 32, cfg["data"]["batch_size"]
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch,), device=device)
    times, started = [], time.perf_counter()
    for step in range(steps + 1):
        tick = time.perf_counter()
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step builds kernels
            times.append(time.perf_counter() - tick)
        if time.perf_counter() - started > within_s and times:
            break
    return batch / statistics.median(times)


def module_flops(net: torch.nn.Module, image_size: int) -> dict[str, int]:
    """Forward FLOPs per image of each module that holds parameters itself (convs, linears,
    norms), by name, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, image_size, image_size))
    net.train(was_training)
    counts = {name.removeprefix(type(net).__name__ + "."): sum(ops.values())
              for name, ops in counter.get_flop_counts().items()}
    return {name: counts.get(name, 0) for name, module in net.named_modules()
            if any(True for _ in module.parameters(recurse=False))}


def fit_flops(net: torch.nn.Module, image_size: int, n_train: int, n_val: int, epochs: int,
              cache: dict | None = None, similarity_images: int = 0) -> float:
    """Floating-point operations of one arm's fit, for ``net`` with its freeze plan applied.

    A trained layer costs 3× its forward per training image (forward, input and weight gradients),
    a frozen one that still runs 1×, a cached prefix nothing after the fill; validation is forward
    only. The fill runs the prefix once per view of each training image (minus the view the
    similarity pass already computed) and once per validation image; the similarity pass is one
    full forward per embedded image.
    """
    from simfreeze.prefix import sequential_units

    flops = module_flops(net, image_size)
    total = sum(flops.values())
    prefix = 0.0
    if cache and cache.get("used"):
        units = sequential_units(net)[:cache["units"]]
        names = {name for name, module in net.named_modules()
                 if any(module is m for _, unit in units for m in unit.modules())}
        prefix = sum(f for name, f in flops.items() if name in names)
    trainable = sum(f for name, f in flops.items()
                    if any(p.requires_grad for p in net.get_submodule(name).parameters(recurse=False)))
    suffix = total - prefix
    per_train_image = suffix + 2 * trainable  # the frozen part of the suffix runs forward only
    work = epochs * (n_train * per_train_image + n_val * suffix) + similarity_images * total
    if prefix:
        fill_views = n_train * cache["views"] - (n_train if cache.get("reused_similarity_pass") else 0)
        work += prefix * (fill_views + n_val)
    return work


FORMATS = [("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True)]


def arm_flops(run: dict, cfg: dict) -> float:
    """``fit_flops`` of a finished run, from its results and similarity.json."""
    from simfreeze.freeze import freeze_leading
    from simfreeze.layers import layer_map
    from simfreeze.model import build_network

    arch = cfg["model"]["arch"]
    net, _ = build_network(arch, 2, None, **cfg["model"]["kwargs"])
    freeze_leading(net, layer_map(net, arch, cfg["freeze"]["l_total"]), run["l_freeze"] or 0)
    similarity = Path(run["run_dir"]) / "similarity.json"
    embedded = sum(json.loads(similarity.read_text())["images_per_class"].values()) if similarity.is_file() else 0
    return fit_flops(net, cfg["data"]["image_size"] or 32, run["images"]["train"], run["images"]["val"],
                     cfg["trainer"]["max_epochs"], run.get("prefix_cache"), embedded)


def format_table(cfg: dict) -> str:
    """Scratch training steps per precision × memory format, and what ``auto`` picks here."""
    lines = ["| precision | channels_last | train images/s | ÷ 32-true |", "|---|---|---|---|"]
    rates = {(p, cl): training_step_rate(cfg, p, cl) for p, cl in FORMATS}
    base = rates[("32-true", False)]
    lines += [f"| {p} | {str(cl).lower()} | {r:.1f} | {r / base:.2f} |" for (p, cl), r in rates.items()]
    accelerator = cfg["trainer"]["accelerator"]
    lines.append(f"\nprecision=auto → {resolve_precision('auto', accelerator)} on {device_type(accelerator)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import train as entry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--uncached", nargs="*", default=["dynamic37", "static45", "head_only"],
                        help="arms also timed once with cache.enabled=false")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    parser.add_argument("--no-formats", action="store_true", help="skip the precision × memory-format steps")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. data.root=...)")
    args = parser.parse_args(argv)
    entry.quiet_lightning()
    logging.getLogger("lightning").setLevel(logging.WARNING)  # keep the tables readable

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    common = [*args.overrides, f"source.cache_dir={args.out / 'sources'}", "progress=lines",
              "+trainer.enable_model_summary=false"]
    base = compose_run(common)
    started = time.perf_counter()
    peak = matmul_peak_flops()
    # Without native bf16 a 2048² bf16 matmul takes about a minute (emulated): measure a small one.
    peak_bf16 = matmul_peak_flops(2048 if native_cpu_bf16() else 512, repeats=2, dtype=torch.bfloat16)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s fp32, {peak_bf16 / 1e9:.1f} GFLOP/s bf16 "
          f"({torch.get_num_threads()} threads)", flush=True)
    formats = "" if args.no_formats else format_table(base)
    if formats:
        print(f"\n{formats}\n", flush=True)
    entry.resolve_source(compose_run([*common, "arm=dynamic"]))  # train the cat source once, untimed

    plan = [(arm, True) for arm in args.arms] + [(arm, False) for arm in args.uncached if arm in args.arms]
    times: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for arm, cached in plan:
            if not cached and repeat > 0:
                continue  # uncached variants: once, to show the accuracy and the time they cost
            label = arm if cached else f"{arm} (uncached)"
            cfg = compose_run([*common, *ARMS[arm], f"cache.enabled={str(cached).lower()}"])
            run = entry.train(cfg, work / f"{label.replace(' ', '_')}-{repeat}")
            times.setdefault(label, []).append(run["fit_seconds"])
            results[label], configs[label] = run, cfg
        if not args.no_plain:
            times.setdefault("plain PyTorch loop", []).append(plain_loop_seconds(compose_run([*common, "arm=scratch"])))

    scratch = statistics.median(times["scratch"]) if "scratch" in times else None
    flops = {label: arm_flops(results[label], configs[label]) for label in results}
    if "scratch" in flops:
        flops["plain PyTorch loop"] = flops["scratch"]
    precision = resolve_precision(base["trainer"]["precision"], base["trainer"]["accelerator"])
    matmul = peak_bf16 if precision.startswith("bf16") else peak
    n_train = next(iter(results.values()))["images"]["train"] if results else 0  # every arm: the same images
    rows = []
    for label, values in times.items():
        median = statistics.median(values)
        run = results.get(label, {})
        row = {"arm": label, "median_s": round(median, 2), "runs": [round(v, 2) for v in values],
               "images_per_s": round(n_train * base["trainer"]["max_epochs"] / median, 1),
               "vs_scratch": round(median / scratch, 3) if scratch else None,
               "work_vs_scratch": round(flops[label] / flops["scratch"], 3) if label in flops and "scratch" in flops else None,
               "gflop_per_s": round(flops[label] / median / 1e9, 1) if label in flops else None,
               "best_val_acc": run.get("best_val_acc"), "l_freeze": run.get("l_freeze")}
        rows.append(row)

    def cell(value):
        return "–" if value is None else str(value)

    lines = ["| arm | median fit s | runs | images/s | ÷ scratch | work ÷ scratch | GFLOP/s | best val acc | L_freeze |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['median_s']} | {', '.join(map(str, r['runs']))} | {r['images_per_s']} | "
              f"{cell(r['vs_scratch'])} | {cell(r['work_vs_scratch'])} | {cell(r['gflop_per_s'])} | "
              f"{cell(r['best_val_acc'])} | {cell(r['l_freeze'])} |" for r in rows]
    report = "\n".join(lines)
    by = {r["arm"]: r for r in rows}
    key = [f"{name} ÷ scratch = {by[name]['vs_scratch']} (work {by[name]['work_vs_scratch']})"
           for name in ("dynamic37", "static45", "head_only") if name in by]
    if "plain PyTorch loop" in by and scratch:
        key.append(f"framework ÷ plain loop = {scratch / by['plain PyTorch loop']['median_s']:.3f}")
    if "scratch" in by:
        achieved = by["scratch"]["gflop_per_s"] * 1e9
        key.append(f"scratch training {achieved / 1e9:.1f} GFLOP/s = {achieved / matmul:.0%} of the "
                   f"{'bf16' if matmul is peak_bf16 else 'fp32'} matmul peak")
    wall = time.perf_counter() - started
    print(f"\n{report}\n\nkey ratios (medians of {args.repeats}, {precision}): " + "; ".join(key)
          + f"\nbench wall time {wall / 60:.1f} min", flush=True)
    (args.out / "bench.json").write_text(json.dumps(
        {"rows": rows, "peak_flops": {"fp32": peak, "bf16": peak_bf16}, "precision": precision, "key": key,
         "formats": formats, "wall_seconds": round(wall, 1)}, indent=1))
    (args.out / "bench.md").write_text(report + "\n\n" + "; ".join(key) + "\n\n" + formats + "\n")


if __name__ == "__main__":
    main()
