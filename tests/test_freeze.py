import json
import math

import lightning as L
import pytest
import torch
import torchvision

from simfreeze.errors import ConfigError
from simfreeze.method.freeze import freeze_leading, plan_rows
from simfreeze.method.plan import FreezeSpec, linear_depth
from simfreeze.networks.layers import layer_map
from simfreeze.runs.transfer import TransferSetup
from tests.helpers import sgd_classifier


def test_paper_formula():
    assert linear_depth(0.9225, 40) == 37  # the paper's S(cat, dog) → 37 frozen layers
    assert linear_depth(-0.3, 40) == 0
    assert linear_depth(1.7, 40) == 40
    assert linear_depth(0.5125, 40) == 21  # a half rounds up (20.5 → 21), as a reader expects
    with pytest.raises(ConfigError, match="NaN"):
        linear_depth(math.nan, 40)


@pytest.mark.parametrize("policy, score, kwargs, expected", [
    ("static", None, {"k": 45}, 45),
    ("none", None, {}, 0),
    ("head_only", None, {}, 49),
    ("linear", 0.9225, {}, 37),
    ("threshold", 0.3, {"low": 0.5, "high": 0.8}, 0),
    ("threshold", 0.3, {"low": 0.5, "high": 0.8, "fallback": "head_only"}, 49),
    ("threshold", 0.6, {"low": 0.5, "high": 0.8}, 24),
    ("threshold", 0.8, {"low": 0.5, "high": 0.8}, 40),
])
def test_policies(policy, score, kwargs, expected):
    assert FreezeSpec(policy, **kwargs).l_freeze(50, 40, score) == expected


@pytest.mark.parametrize("policy, kwargs, message", [
    ("static", {"k": 50}, r"freeze.k=50 must lie in \[0, 49\]"),
    ("threshold", {"low": 0.9, "high": 0.8}, "need 0 ≤ low ≤ high ≤ 1"),
    ("threshold", {"low": -0.1, "high": 0.8}, "need 0 ≤ low ≤ high ≤ 1"),
    ("greedy", {}, "freeze.policy=greedy must be one of"),
])
def test_bad_plans_are_refused(policy, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FreezeSpec(policy, **kwargs).l_freeze(50, 40, 0.5)


@pytest.mark.parametrize("freeze, policy, k", [
    ({"policy": "none", "l_freeze": 30}, "static", 30),
    ({"policy": "none", "l_freeze": "dynamic"}, "linear", 45),
    ({"policy": "none", "depth": 30}, "static", 30),              # the deprecated name still works
    ({"policy": "head_only", "l_freeze": None}, "head_only", 45),
])
def test_the_l_freeze_shorthand_becomes_a_policy(freeze, policy, k):
    spec = FreezeSpec.from_config(freeze)
    assert (spec.policy, spec.k) == (policy, k)


def test_the_shorthand_refuses_what_is_not_a_depth():
    with pytest.raises(ConfigError, match="freeze.l_freeze=deep must be a number of frozen layers or 'dynamic'"):
        FreezeSpec.from_config({"l_freeze": "deep"})
    with pytest.raises(ConfigError, match="disagree"):
        FreezeSpec.from_config({"l_freeze": 30, "depth": 35})


def test_a_plan_reaches_only_the_depths_its_policy_can_give():
    assert FreezeSpec("static", k=37).reachable(50, 40) == [37]
    assert FreezeSpec("linear").reachable(50, 40) == list(range(41))
    assert FreezeSpec("threshold", fallback="head_only").reachable(50, 40) == [*range(41), 49]


def test_freeze_leading_sets_requires_grad_and_holds_bn_in_eval():
    net = torchvision.models.resnet50(num_classes=2)
    layers = layer_map(net, "resnet50")
    norms = freeze_leading(net, layers, 37)
    rows = plan_rows(net, layers, 37)
    assert [r.frozen for r in rows] == [True] * 37 + [False] * 13
    assert rows[36].name == "layer3.4.conv3" and rows[37].name == "layer3.5.conv1"
    assert not net.layer3[4].conv3.weight.requires_grad and net.layer3[5].conv1.weight.requires_grad
    assert not net.layer1[0].downsample[0].weight.requires_grad
    assert net.fc.weight.requires_grad and net.layer4[0].conv1.weight.requires_grad
    assert all(not m.training for m in norms) and len(norms) == 37 + 3  # + the downsample BNs of layer1..3
    assert sum(r.parameters for r in rows) == sum(p.numel() for p in net.parameters())


def test_short_fit_leaves_frozen_weights_and_buffers_bit_identical(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    layers = layer_map(net, "resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    freezer = TransferSetup(None, FreezeSpec("static", k=7), layers, out_dir=tmp_path)
    module = sgd_classifier(net, lr=0.1, weight_decay=0.1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[freezer])
    frozen = {m for layer in layers.layers[:7] for m in layer.modules}
    modes = []  # every forward of a frozen BatchNorm, in training steps and validation alike
    for name in frozen:
        if isinstance(net.get_submodule(name), torch.nn.BatchNorm2d):
            net.get_submodule(name).register_forward_pre_hook(lambda m, args: modes.append(m.training))
    trainer.fit(module, data, data)
    assert len(modes) > 6 * 3 and not any(modes)  # eval mode at every step, also after mid-epoch validation
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    frozen_keys = {k for k in before if k.rpartition(".")[0] in frozen}
    assert frozen_keys and not (changed & frozen_keys), "a frozen weight or BN buffer moved"
    assert "layer2.1.conv2.weight" in changed  # the trainable part did learn
    assert all(p.grad is None for m in frozen for p in net.get_submodule(m).parameters())
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in net.parameters() if p.requires_grad}
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["l_freeze"] == freezer.record()["l_freeze"] == 7 and plan["first_trainable"] == layers.names[7]


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_frozen_blocks_drop_nothing_and_stay_bit_identical_while_the_rest_trains(family, tmp_path):
    """Dropout and stochastic depth inside frozen blocks act as in evaluation, so a frozen block's output
    is a fixed function of its input (what the prefix cache relies on); its weights do not move."""
    from torchvision.models import VisionTransformer
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    if family == "vit":
        net, arch = VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                                      dropout=0.5, num_classes=2), "vit_b_16"
    else:
        net, arch = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.5,
                             num_classes=2), "convnext_tiny"
    layers = layer_map(net, arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    freezer = TransferSetup(None, FreezeSpec("static", k=3), layers, out_dir=tmp_path)
    module = sgd_classifier(net, lr=0.1)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[freezer])
    frozen_out, frozen_modes, trained_modes = [], [], []
    last_frozen = net.get_submodule(layers.names[2])
    last_frozen.register_forward_hook(lambda m, args, out: frozen_out.append(out.detach().clone()))
    for i, layer in enumerate(layers.layers[:-1]):
        for name in layer.modules:
            kept = frozen_modes if i < 3 else trained_modes
            if type(net.get_submodule(name)).__name__ in ("Dropout", "StochasticDepth"):
                net.get_submodule(name).register_forward_pre_hook(lambda m, args, kept=kept: kept.append(m.training))
    trainer.fit(module, data)
    assert frozen_modes and not any(frozen_modes) and trained_modes and all(trained_modes)
    assert torch.equal(frozen_out[0], frozen_out[2])  # the same batch at steps 1 and 3: the same frozen output
    frozen = {name for layer in layers.layers[:3] for name in layer.modules}
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    frozen_keys = {k for k in before if k.rpartition(".")[0] in frozen}
    assert frozen_keys and not (changed & frozen_keys) and changed
