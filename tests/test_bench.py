"""The benchmark's work model and a scaled-down run of `python -m simfreeze.bench`."""

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from simfreeze import bench
from simfreeze.speed import precision
from simfreeze.errors import ConfigError
from simfreeze.method.freeze import freeze_leading
from simfreeze.networks.layers import layer_map
from simfreeze.networks.units import sequential_units
from simfreeze.speed.prefix import frozen_prefix_length


def planned_resnet18(l_freeze: int):
    net = torchvision.models.resnet18(num_classes=2)
    freeze_leading(net, layer_map(net, "resnet18"), l_freeze)
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
    bench.main(["--epochs", "3", "2", "--repeats", "1", "--arms", "scratch", "head_only", "--uncached", "head_only", "--no-formats",
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
    # the cost curve: every cached arm at every --epochs value, from the same source file
    assert [(r["arm"], r["epochs"]) for r in report["curve"]] == [
        ("scratch", 3), ("head_only", 3), ("scratch", 2), ("head_only", 2)]
    assert (out / "cost_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows["head_only"]["precision_phases"]["cache_fill"] == "32-true"
    small = bench.compose_run(["model.arch=resnet18", "data.image_size=32"])
    assert bench.training_step_rate(small, "32-true", channels_last=True, steps=2) > 0
    rates = bench.phase_rates(small, "32-true", steps=1)
    # resnet18 has 18 layers: of the bench's depths (37, 45, all but the head) only head_only fits
    assert list(rates) == ["scratch training", "similarity pass", "cache fill (head_only)", "cached tail training (head_only)"]
    assert all(rate > 0 for rate in rates.values())


def test_native_bf16_switch_forces_either_answer(monkeypatch):
    monkeypatch.setenv("SIMFREEZE_NATIVE_BF16", "1")
    assert precision.native_cpu_bf16() and precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setenv("SIMFREEZE_NATIVE_BF16", "0")
    assert not precision.native_cpu_bf16() and precision.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setenv("SIMFREEZE_NATIVE_BF16", "yes")
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        precision.native_cpu_bf16()


def test_convolutions_strided_past_their_input_run_in_fp32_and_reproduce_under_bf16():
    from torchvision.models import resnet18

    net = resnet18(num_classes=2)
    # 16×16 images: layer3 ends at 1×1, so layer4's stride-2 convolutions see a 1×1 map.
    names = precision.bf16_unsafe_convs(net, torch.zeros(1, 3, 16, 16))
    assert names == ["layer4.0.conv1", "layer4.0.downsample.0"]
    assert precision.bf16_unsafe_convs(net, torch.zeros(1, 3, 32, 32)) == []  # 2×2 maps: safe
    assert all(m.training for m in net.modules())  # the probe left the modes as they were

    def weight_grad(conv):
        torch.manual_seed(0)
        x = torch.randn(4, 16, 1, 1)
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().sum().backward()
        return out.dtype, conv.weight.grad.clone()

    conv = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
    holder = torch.nn.Sequential(conv)
    precision.run_in_fp32(holder, ["0"])
    assert type(conv) is precision.Fp32Conv2d and list(holder.state_dict()) == ["0.weight"]
    (dtype, first), (_, again) = weight_grad(conv), weight_grad(conv)
    assert dtype == torch.float32 and torch.equal(first, again)
    off_centre = first.clone()
    off_centre[:, :, 1, 1] = 0
    assert not off_centre.any()  # only the centre tap ever touches a 1×1 input
