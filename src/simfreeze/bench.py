"""`python -m simfreeze.bench`: fit times of the arms side by side, in one process and one sitting.

Runs the paper protocol (ResNet-50, 1,280 train / 320 val, 3 epochs, the default recipe) for
scratch, paper37 (the paper's 37 frozen layers with its similarity pass), static 45 and head_only — with and
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

from simfreeze.speed.precision import device_type, native_cpu_bf16, resolve_precision, with_resolved_precision

CONF = Path(__file__).resolve().parents[2] / "conf"

ARMS = {  # name → overrides on top of +experiment=cat_to_dog
    "scratch": ["arm=scratch"],
    # The paper's depth for S(cat, dog) = 0.9225: a static 37 with the similarity pass, which a dynamic
    # run that lands on 37 also runs (our cat model gives S ≈ 0.98, so arm=dynamic would freeze 39).
    "paper37": ["arm=static45", "freeze.k=37", "similarity.enabled=true", "name=paper37:dog"],  # its own name in logs
    "static45": ["arm=static45"],
    "head_only": ["arm=head_only"],
}


def compose_run(overrides: list[str]) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        # One device: devices=auto on a machine with several GPUs would start DDP, relaunching the bench.
        cfg = compose("train", overrides=["+experiment=cat_to_dog", "trainer.devices=1", *overrides])
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
    from simfreeze.networks.build import build_network

    net, _ = build_network(cfg["model"]["arch"], num_classes, None, **cfg["model"]["kwargs"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = bench_device(cfg)
    return net.to(device, memory_format=memory_format), device, memory_format


def plain_loop_seconds(cfg: dict, out: Path) -> tuple[float, float]:
    """The scratch arm's training as a bare PyTorch loop: same model, data, batches, precision,
    memory format, optimizer, schedule and epochs, with validation each epoch; no Lightning.

    Like a run, it writes ``last.ckpt`` (weights, optimizer, schedule) every
    ``checkpoint.last_every_n_epochs`` epochs and at the end, and the weights of the best validation
    accuracy, into ``out``. Returns (seconds, of which checkpoint writes).
    """
    import hydra

    from simfreeze.data.datamodule import TaskDataModule
    from simfreeze.data.images import prepare_batch

    torch.manual_seed(cfg["seed"])
    dm = TaskDataModule(**cfg["data"])
    dm.setup()
    net, device, memory_format = scratch_network(cfg, dm.num_classes, cfg["model"]["channels_last"])
    precision = resolve_precision(cfg["trainer"]["precision"], cfg["trainer"]["accelerator"])
    (x_train, y_train), (x_val, y_val) = [(x.to(device), y.to(device)) for x, y in (dm.tensors["train"], dm.tensors["val"])]
    mean, std = dm.mean.to(device), dm.std.to(device)
    batch, epochs, every = dm.batch_size, cfg["trainer"]["max_epochs"], cfg["checkpoint"]["last_every_n_epochs"]
    steps = epochs * -(-len(y_train) // batch)
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    scheduler = hydra.utils.instantiate(cfg["scheduler"])(optimizer, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg["model"]["label_smoothing"])

    def prepare(images, flip=False):
        x = prepare_batch(images, mean, std, dm.image_size, flip=flip)
        return x.contiguous(memory_format=memory_format)

    out.mkdir(parents=True, exist_ok=True)
    best, saving = -1.0, 0.0
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for index in torch.randperm(len(y_train), device=device).split(batch):
            with autocast(precision, device):
                loss = loss_fn(net(prepare(x_train[index], dm.flip)), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        correct = 0
        with torch.no_grad(), autocast(precision, device):
            for i in range(0, len(y_val), dm.eval_batch_size):
                logits = net(prepare(x_val[i:i + dm.eval_batch_size]))
                correct += int((logits.argmax(1) == y_val[i:i + dm.eval_batch_size]).sum())
        tick = time.perf_counter()
        if correct / len(y_val) > best:
            best = correct / len(y_val)
            torch.save({"state_dict": net.state_dict()}, out / "best.ckpt")
        if epoch + 1 == epochs or (every and (epoch + 1) % every == 0):
            torch.save({"state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch}, out / "last.ckpt")
        saving += time.perf_counter() - tick
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, saving


def timed_rate(step, images: int, device: torch.device, steps: int = 6, within_s: float = 20.0) -> float:
    """Images/s of ``step`` (which handles ``images`` images): the median after one warm-up call,
    over at most ``steps`` calls or ``within_s`` seconds (emulated bf16 can be very slow)."""
    times, started = [], time.perf_counter()
    for call in range(steps + 1):
        tick = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if call:  # the first call builds kernels
            times.append(time.perf_counter() - tick)
        if time.perf_counter() - started > within_s and times:
            break
    return images / statistics.median(times)


def training_step_rate(cfg: dict, precision: str, channels_last: bool, steps: int = 6,
                       within_s: float = 20.0) -> float:
    """Images/s of scratch training steps (the arm's model, batch and optimizer, random images)
    under a precision and memory format (``timed_rate``)."""
    import hydra

    torch.manual_seed(0)
    net, device, memory_format = scratch_network(cfg, 2, channels_last)
    net.train()
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    size, batch = cfg["data"]["image_size"] or 32, cfg["data"]["batch_size"]
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch,), device=device)

    def step():
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return timed_rate(step, batch, device, steps, within_s)


PHASE_DEPTHS = {"paper37": 37, "static45": 45, "head_only": -1}  # frozen layers; -1: all but the head


def phase_rates(cfg: dict, precision: str, steps: int = 6) -> dict[str, float]:
    """Images/s of each phase of a fit under ``precision``: scratch training, the similarity pass
    (a full forward in eval mode), and per transfer arm the cache fill (the frozen prefix forward)
    and the cached tail's training steps, with the arm's batch sizes and optimizer on random images."""
    import hydra

    from simfreeze.method.freeze import freeze_leading
    from simfreeze.networks.layers import layer_map
    from simfreeze.networks.units import run_units, sequential_units
    from simfreeze.speed.prefix import frozen_prefix_length

    torch.manual_seed(0)
    net, device, memory_format = scratch_network(cfg, 2, cfg["model"]["channels_last"])
    size, batch = cfg["data"]["image_size"] or 32, cfg["data"]["batch_size"]
    eval_batch = cfg["data"]["eval_batch_size"] or batch
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch,), device=device)
    x_eval = torch.randn(eval_batch, 3, size, size, device=device).contiguous(memory_format=memory_format)

    def train_step(units, inputs, optimizer):
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(run_units(units, inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(units, inputs):
        with torch.no_grad(), autocast(precision, device):
            return run_units(units, inputs)

    units = sequential_units(net) or [("net", net)]
    net.train()
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    rates = {"scratch training": timed_rate(lambda: train_step(units, x, optimizer), batch, device, steps)}
    net.eval()
    rates["similarity pass"] = timed_rate(lambda: forward(units, x_eval), eval_batch, device, max(2, steps // 2))
    layers = layer_map(net, cfg["model"]["arch"], cfg["freeze"]["l_total"])
    for arm, depth in PHASE_DEPTHS.items():
        depth = len(layers) - 1 if depth < 0 else depth
        if depth >= len(layers):
            continue
        for p in net.parameters():
            p.requires_grad_(True)
        freeze_leading(net, layers, depth)
        k = frozen_prefix_length(units)
        prefix, tail = units[:k], units[k:]
        net.eval()
        rates[f"cache fill ({arm})"] = timed_rate(lambda: forward(prefix, x_eval), eval_batch, device,
                                                  max(2, steps // 2))
        features = forward(prefix, x).contiguous(memory_format=memory_format)
        for _, unit in tail:
            unit.train()
        optimizer = hydra.utils.instantiate(cfg["optimizer"])([p for p in net.parameters() if p.requires_grad])
        rates[f"cached tail training ({arm})"] = timed_rate(lambda: train_step(tail, features, optimizer),
                                                            batch, device, steps)
    return rates


def phase_table(cfg: dict) -> tuple[str, dict]:
    """fp32 against bf16 autocast for every phase of a fit: the measurement behind
    ``trainer.precision=auto`` (docs/performance.md)."""
    rates = {p: phase_rates(cfg, p) for p in ("32-true", "bf16-mixed")}
    lines = ["| phase | 32-true images/s | bf16-mixed images/s | bf16 ÷ fp32 | faster |", "|---|---|---|---|---|"]
    for phase, fp32 in rates["32-true"].items():
        bf16 = rates["bf16-mixed"][phase]
        lines.append(f"| {phase} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f} | {'bf16' if bf16 > fp32 else 'fp32'} |")
    accelerator = cfg["trainer"]["accelerator"]
    lines.append(f"\nprecision=auto → {resolve_precision('auto', accelerator)} on {device_type(accelerator)}")
    return "\n".join(lines), rates


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
    from simfreeze.networks.units import sequential_units

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
    from simfreeze.method.freeze import freeze_leading
    from simfreeze.networks.layers import layer_map
    from simfreeze.networks.build import build_network

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


def curve_figure(curve: list[dict], path: Path) -> None:
    """Time ÷ scratch against epochs per arm (solid), beside each arm's work ÷ scratch (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for colour, arm in zip(("tab:red", "tab:blue", "tab:green", "tab:purple"),
                           dict.fromkeys(r["arm"] for r in curve if r["arm"] != "scratch")):
        rows = [r for r in curve if r["arm"] == arm]
        epochs = [r["epochs"] for r in rows]
        ax.plot(epochs, [r["vs_scratch"] for r in rows], "o-", color=colour, label=f"{arm}: time ÷ scratch")
        ax.plot(epochs, [r["work_vs_scratch"] for r in rows], "--", color=colour, alpha=0.6, label=f"{arm}: work ÷ scratch")
    ax.set_xscale("log")
    ticks = sorted({r["epochs"] for r in curve})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("epochs")
    ax.set_ylabel("÷ scratch at the same epochs")
    ax.set_ylim(0, 1.3 * max(max(r["vs_scratch"], r["work_vs_scratch"]) for r in curve if r["arm"] != "scratch"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("Transfer arms against scratch as training grows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from simfreeze.runs.fit import fit
    from simfreeze.runs.progress import quiet_lightning
    from simfreeze.runs.sources import source_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="epochs per fit; several give the cost curve (time ÷ scratch per epochs); "
                             "default: the experiment's trainer.max_epochs")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="repetitions per --epochs value (one number: the same for every value)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--uncached", nargs="*", default=["paper37", "static45", "head_only"],
                        help="arms also timed once with cache.enabled=false (at the first --epochs)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    parser.add_argument("--no-formats", action="store_true",
                        help="skip the precision × memory-format and per-phase precision tables")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. data.root=...)")
    args = parser.parse_args(argv)
    quiet_lightning()
    logging.getLogger("lightning").setLevel(logging.WARNING)  # keep the tables readable

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    common = [*args.overrides, f"source.cache_dir={args.out / 'sources'}", "progress=lines",
              "+trainer.enable_model_summary=false"]
    base = compose_run(common)
    epoch_list = args.epochs or [base["trainer"]["max_epochs"]]
    repeats = args.repeats * len(epoch_list) if len(args.repeats) == 1 else args.repeats
    if len(repeats) != len(epoch_list):
        parser.error(f"--repeats gives {len(repeats)} values for {len(epoch_list)} --epochs values")
    started = time.perf_counter()
    peak = matmul_peak_flops()
    # Without native bf16 a 2048² bf16 matmul takes about a minute (emulated): measure a small one.
    peak_bf16 = matmul_peak_flops(2048 if native_cpu_bf16() else 512, repeats=2, dtype=torch.bfloat16)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s fp32, {peak_bf16 / 1e9:.1f} GFLOP/s bf16 "
          f"({torch.get_num_threads()} threads)", flush=True)
    formats = phases = ""
    phase_record: dict = {}
    if not args.no_formats:
        formats = format_table(base)
        phases, phase_record = phase_table(base)
        print(f"\n{formats}\n\n{phases}\n", flush=True)
    # The cat source is trained once, untimed, at the experiment's epochs; every arm at every
    # --epochs value starts from that same file, so the curve varies only the arm's own training.
    weights, _ = source_weights(with_resolved_precision(compose_run([*common, "arm=dynamic"])), train=fit)
    from_source = ["source.task=null", f"source.weights={weights}", "similarity.source_classes=[cat]"]

    plan = [(arm, True) for arm in args.arms] + [(arm, False) for arm in args.uncached if arm in args.arms]
    times: dict[tuple[int, str], list[float]] = {}
    results: dict[tuple[int, str], dict] = {}
    configs: dict[tuple[int, str], dict] = {}
    saving: list[float] = []
    for epochs, count in zip(epoch_list, repeats):
        first = epochs == epoch_list[0]
        for repeat in range(count):
            for arm, cached in plan:
                if not cached and (repeat > 0 or not first):
                    continue  # uncached variants: once, to show the accuracy and the time they cost
                label = arm if cached else f"{arm} (uncached)"
                cfg = compose_run([*common, *ARMS[arm], *(from_source if ARMS[arm] != ["arm=scratch"] else []),
                                   f"trainer.max_epochs={epochs}", f"cache.enabled={str(cached).lower()}"])
                run = fit(cfg, work / f"{label.replace(' ', '_')}-e{epochs}-{repeat}")
                times.setdefault((epochs, label), []).append(run["fit_seconds"])
                results[epochs, label], configs[epochs, label] = run, cfg
            if first and not args.no_plain:
                seconds, saved = plain_loop_seconds(compose_run([*common, "arm=scratch"]), work / f"plain-{repeat}")
                times.setdefault((epochs, "plain PyTorch loop"), []).append(seconds)
                saving.append(saved)

    flops = {key: arm_flops(results[key], configs[key]) for key in results}
    precision = resolve_precision(base["trainer"]["precision"], base["trainer"]["accelerator"])
    matmul = peak_bf16 if precision.startswith("bf16") else peak
    n_train = next(iter(results.values()))["images"]["train"] if results else 0  # every arm: the same images

    def row(epochs: int, label: str) -> dict:
        values = times[epochs, label]
        median = statistics.median(values)
        scratch = statistics.median(times[epochs, "scratch"]) if (epochs, "scratch") in times else None
        work = flops.get((epochs, label), flops.get((epochs, "scratch")) if label == "plain PyTorch loop" else None)
        run = results.get((epochs, label), {})
        return {"arm": label, "epochs": epochs, "median_s": round(median, 2), "runs": [round(v, 2) for v in values],
                "images_per_s": round(n_train * epochs / median, 1),
                "vs_scratch": round(median / scratch, 3) if scratch else None,
                "work_vs_scratch": round(work / flops[epochs, "scratch"], 3) if work and (epochs, "scratch") in flops else None,
                "gflop_per_s": round(work / median / 1e9, 1) if work else None,
                "best_val_acc": run.get("best_val_acc"), "l_freeze": run.get("l_freeze"),
                "precision_phases": run.get("precision_phases")}

    first_epochs = epoch_list[0]
    rows = [row(e, label) for e, label in times if e == first_epochs]
    curve = [row(e, label) for e, label in times if "(" not in label and label != "plain PyTorch loop"]

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
           for name in ("paper37", "static45", "head_only") if name in by]
    if "plain PyTorch loop" in by and "scratch" in by:
        plain = by["plain PyTorch loop"]["median_s"]
        key.append(f"framework ÷ plain loop = {by['scratch']['median_s'] / plain:.3f} (both write the same checkpoints; "
                   f"the plain loop's writes took {statistics.median(saving):.2f} s, without them the ratio is "
                   f"{by['scratch']['median_s'] / (plain - statistics.median(saving)):.3f})")
    if "scratch" in by:
        achieved = by["scratch"]["gflop_per_s"] * 1e9
        key.append(f"scratch training {achieved / 1e9:.1f} GFLOP/s = {achieved / matmul:.0%} of the "
                   f"{'bf16' if matmul is peak_bf16 else 'fp32'} matmul peak")
    curve_text = ""
    if len(epoch_list) > 1:
        curve_lines = ["| arm | " + " | ".join(f"{e} epochs: time ÷ scratch (work)" for e in epoch_list) + " |",
                       "|---|" + "---|" * len(epoch_list)]
        for arm in dict.fromkeys(r["arm"] for r in curve):
            cells = {r["epochs"]: f"{r['vs_scratch']} ({r['work_vs_scratch']}); {r['median_s']} s"
                     for r in curve if r["arm"] == arm}
            curve_lines.append(f"| {arm} | " + " | ".join(cells.get(e, "–") for e in epoch_list) + " |")
        curve_text = "\n".join(curve_lines)
        curve_figure(curve, args.out / "cost_curve.png")
    wall = time.perf_counter() - started
    print(f"\n{report}\n\nkey ratios (medians of {repeats[0]}, {first_epochs} epochs, {precision}): " + "; ".join(key)
          + (f"\n\ncost curve (medians of {', '.join(map(str, repeats))} at {', '.join(map(str, epoch_list))} epochs):\n"
             f"{curve_text}" if curve_text else "") + f"\nbench wall time {wall / 60:.1f} min", flush=True)
    (args.out / "bench.json").write_text(json.dumps(
        {"rows": rows, "curve": curve, "peak_flops": {"fp32": peak, "bf16": peak_bf16}, "precision": precision,
         "key": key, "formats": formats, "phases": phase_record, "wall_seconds": round(wall, 1)}, indent=1))
    (args.out / "bench.md").write_text(report + "\n\n" + "; ".join(key) + "\n\n" + formats + "\n\n" + phases
                                       + ("\n\n" + curve_text if curve_text else "") + "\n")


if __name__ == "__main__":
    main()
