"""`python -m simfreeze.bench`: fit times of the arms side by side, in one process and one sitting.

Runs the paper protocol (ResNet-50, 1,280 train / 320 val, 3 epochs, the default recipe) for
scratch, dynamic transfer (the paper's 37 frozen layers), static 45 and head_only — with and
without the frozen-prefix cache — plus a plain PyTorch loop doing the same scratch training, and
reports medians over repetitions, ratios to scratch, and training FLOP/s against the measured
matrix-multiply peak of this machine. Fit time of a transfer arm includes its similarity pass
and its cache fill. The cat source model is trained once beforehand (not timed).
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

CONF = Path(__file__).resolve().parents[2] / "conf"
RESNET50_GMAC_224 = 4.09  # forward multiply-accumulates per image at 224×224

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


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best observed fp32 GEMM FLOP/s on this device (CPU here)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def plain_loop_seconds(cfg: dict) -> float:
    """The scratch arm's training as a bare PyTorch loop: same model, data, batches, optimizer,
    schedule and epochs, with validation each epoch; no Lightning."""
    import hydra

    from simfreeze.data import TaskDataModule, prepare_batch
    from simfreeze.model import build_network

    torch.manual_seed(cfg["seed"])
    dm = TaskDataModule(**cfg["data"])
    dm.setup()
    net, _ = build_network(cfg["model"]["arch"], dm.num_classes, None, **cfg["model"]["kwargs"])
    (x_train, y_train), (x_val, y_val) = dm.tensors["train"], dm.tensors["val"]
    batch, epochs = dm.batch_size, cfg["trainer"]["max_epochs"]
    steps = epochs * -(-len(y_train) // batch)
    optimizer = hydra.utils.instantiate(cfg["optimizer"])(net.parameters())
    scheduler = hydra.utils.instantiate(cfg["scheduler"])(optimizer, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg["model"]["label_smoothing"])
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for index in torch.randperm(len(y_train)).split(batch):
            x = prepare_batch(x_train[index], dm.mean, dm.std, dm.image_size, flip=dm.flip)
            loss = loss_fn(net(x), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        with torch.no_grad():
            for i in range(0, len(y_val), dm.eval_batch_size):
                net(prepare_batch(x_val[i:i + dm.eval_batch_size], dm.mean, dm.std, dm.image_size))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    import train as entry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--uncached", nargs="*", default=["dynamic37", "static45", "head_only"],
                        help="arms also timed once with cache.enabled=false")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. data.root=...)")
    args = parser.parse_args(argv)
    entry.quiet_lightning()
    logging.getLogger("lightning").setLevel(logging.WARNING)  # keep the tables readable

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    common = [*args.overrides, f"source.cache_dir={args.out / 'sources'}", "progress=lines",
              "+trainer.enable_model_summary=false"]
    peak = matmul_peak_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (fp32, {torch.get_num_threads()} threads)", flush=True)
    entry.resolve_source(compose_run([*common, "arm=dynamic"]))  # train the cat source once, untimed

    plan = [(arm, True) for arm in args.arms] + [(arm, False) for arm in args.uncached if arm in args.arms]
    times: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for arm, cached in plan:
            if not cached and repeat > 0:
                continue  # uncached variants: once, to show the accuracy and the time they cost
            label = arm if cached else f"{arm} (uncached)"
            cfg = compose_run([*common, *ARMS[arm], f"cache.enabled={str(cached).lower()}"])
            run = entry.train(cfg, work / f"{label.replace(' ', '_')}-{repeat}")
            times.setdefault(label, []).append(run["fit_seconds"])
            results[label] = run
        if not args.no_plain:
            times.setdefault("plain PyTorch loop", []).append(plain_loop_seconds(compose_run([*common, "arm=scratch"])))

    n_train = results["scratch"]["images"]["train"] if "scratch" in results else 1280
    size = compose_run(common)["data"]["image_size"] or 32
    epochs = compose_run(common)["trainer"]["max_epochs"]
    scratch = statistics.median(times["scratch"]) if "scratch" in times else None
    rows = []
    for label, values in times.items():
        median = statistics.median(values)
        run = results.get(label, {})
        row = {"arm": label, "median_s": round(median, 2), "runs": [round(v, 2) for v in values],
               "images_per_s": round(n_train * epochs / median, 1),
               "vs_scratch": round(median / scratch, 3) if scratch else None,
               "best_val_acc": run.get("best_val_acc"), "l_freeze": run.get("l_freeze")}
        rows.append(row)
    # Training FLOP/s of the scratch arm: ≈ 3 × forward FLOPs per image (forward + backward).
    flops = 3 * 2 * RESNET50_GMAC_224 * 1e9 * (size / 224) ** 2 * n_train * epochs
    lines = ["| arm | median fit s | runs | images/s | ÷ scratch | best val acc | L_freeze |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['median_s']} | {', '.join(map(str, r['runs']))} | {r['images_per_s']} | "
              f"{r['vs_scratch']} | {r['best_val_acc'] if r['best_val_acc'] is not None else '–'} | "
              f"{r['l_freeze'] if r['l_freeze'] is not None else '–'} |" for r in rows]
    report = "\n".join(lines)
    by = {r["arm"]: r for r in rows}
    key = [f"{name} ÷ scratch = {by[name]['vs_scratch']}" for name in ("dynamic37", "static45", "head_only") if name in by]
    if "plain PyTorch loop" in by and scratch:
        key.append(f"framework ÷ plain loop = {scratch / by['plain PyTorch loop']['median_s']:.3f}")
    if scratch:
        achieved = flops / scratch
        key.append(f"scratch training {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of matmul peak")
    print(f"\n{report}\n\nkey ratios (medians of {args.repeats}): " + "; ".join(key), flush=True)
    (args.out / "bench.json").write_text(json.dumps({"rows": rows, "peak_flops": peak, "key": key}, indent=1))
    (args.out / "bench.md").write_text(report + "\n\n" + "; ".join(key) + "\n")


if __name__ == "__main__":
    main()
