"""The benchmark's work model and a scaled-down run of `python -m simfreeze.bench`."""

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from simfreeze import bench, precision
from simfreeze.freeze import freeze_leading
from simfreeze.layers import layer_map
from simfreeze.prefix import frozen_prefix_length, sequential_units


def planned_resnet18(n_frozen: int):
    net = torchvision.models.resnet18(num_classes=2)
    freeze_leading(net, layer_map(net, "resnet18"), n_frozen)
    return net


def test_module_flops_add_up_to_the_whole_forward():
    net = planned_resnet18(0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, 32, 32))
    flops = bench.module_flops(net, 32)
    assert sum(flops.values()) == counter.get_total_flops() > 0
    assert flops["conv1"] == 2 * 3 * 7 * 7 * 64 * 16 * 16 and flops["fc"] == 2 * 512 * 2


def test_fit_flops_counts_three_passes_for_trained_layers_and_one_fill_per_view():
    total = sum(bench.module_flops(planned_resnet18(0), 32).values())
    assert bench.fit_flops(planned_resnet18(0), 32, n_train=10, n_val=4, epochs=2) == 2 * (10 * 3 + 4) * total

    net = planned_resnet18(17)  # head only: the prefix ends at layer4.1, fc trains
    flops = bench.module_flops(net, 32)
    k = frozen_prefix_length(sequential_units(net))
    cache = {"used": True, "units": k, "views": 2, "reused_similarity_pass": False}
    fc = flops["fc"]
    prefix = total - fc
    expected = 2 * (10 * 3 * fc + 4 * fc) + prefix * (10 * 2 + 4)
    assert bench.fit_flops(net, 32, 10, 4, 2, cache) == pytest.approx(expected)
    # the similarity pass: a full forward per image, and the fill skips the view it computed
    shared = {**cache, "reused_similarity_pass": True}
    assert bench.fit_flops(net, 32, 10, 4, 2, shared, similarity_images=10) == pytest.approx(
        expected + 10 * total - 10 * prefix)
    # uncached, the frozen prefix still runs forward every step
    assert bench.fit_flops(net, 32, 10, 4, 2) == pytest.approx(2 * (10 * (total + 2 * fc) + 4 * total))


def test_precision_auto_follows_the_device_type(monkeypatch):
    assert precision.resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"


def test_bench_runs_the_arms_the_plain_loop_and_writes_its_table(image_folder_with_test, tmp_path, capsys):
    out = tmp_path / "bench"
    bench.main(["--repeats", "1", "--arms", "scratch", "head_only", "--uncached", "head_only", "--no-formats",
                "--out", str(out), f"data.root={image_folder_with_test}", "data.classes=[ant,bee]",
                "data.positive=bee", "source.task.positive=ant", "data.per_class=24", "data.image_size=32",
                "model.arch=resnet18", "trainer.max_epochs=3", "trainer.precision=32-true"])
    report = json.loads((out / "bench.json").read_text())
    rows = {row["arm"]: row for row in report["rows"]}
    assert list(rows) == ["scratch", "head_only", "head_only (uncached)", "plain PyTorch loop"]
    assert rows["scratch"]["vs_scratch"] == rows["scratch"]["work_vs_scratch"] == 1.0
    # head_only trains only fc: a fraction of scratch's work; more of it without the cache, which
    # over 3 epochs runs the prefix 3 × (train + val) times instead of 2 × train + val
    assert 0 < rows["head_only"]["work_vs_scratch"] < rows["head_only (uncached)"]["work_vs_scratch"] < 1
    assert rows["head_only"]["l_freeze"] == 17 and report["precision"] == "32-true"
    assert "framework ÷ plain loop" in capsys.readouterr().out
    assert bench.training_step_rate(bench.compose_run(["model.arch=resnet18", "data.image_size=32"]),
                                    "32-true", channels_last=True, steps=2) > 0
