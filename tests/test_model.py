import pytest
import torch
from torch import nn

from simfreeze.errors import WeightsError
from simfreeze.networks.build import build_network, classifier_head_name, count_parameters, read_state_dict
from tests.helpers import sgd_classifier


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("alexnet", "classifier.6")])
def test_any_torchvision_arch_gets_a_task_sized_head(arch, head):
    net, record = build_network(arch, num_classes=3)
    assert record["head"] == head == classifier_head_name(net)
    assert net.get_submodule(head).out_features == 3


def test_unknown_arch_names_the_choices():
    with pytest.raises(WeightsError, match="model.arch='resnet51'.*resnet50"):
        build_network("resnet51", 2)


def test_unknown_weights_enum_lists_the_real_ones():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        build_network("resnet18", 2, weights="IMAGENET9K")


def test_local_state_dict_loads_with_a_replaced_head(tmp_path):
    source, _ = build_network("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    net, record = build_network("resnet18", num_classes=2, weights=str(tmp_path / "source.pt"))
    assert record["dropped_head_keys"] == ["fc.bias", "fc.weight"]
    assert net.fc.out_features == 2
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, net.state_dict()[key]), key


def test_lightning_checkpoint_weights_are_read(tmp_path):
    net, _ = build_network("resnet18", num_classes=2)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "run.ckpt")
    assert set(read_state_dict(tmp_path / "run.ckpt")) == set(net.state_dict())


def test_checkpoint_that_does_not_fit_lists_the_offending_keys(tmp_path):
    other, _ = build_network("resnet34", num_classes=2)
    torch.save(other.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(WeightsError, match=r"model.weights='.*r34.pt': checkpoint does not fit.*unexpected: layer1.2.*\(resnet18\)"):
        build_network("resnet18", 2, weights=str(tmp_path / "r34.pt"))
    with pytest.raises(WeightsError, match="no such checkpoint"):
        build_network("resnet18", 2, weights=str(tmp_path / "missing.pt"))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "module.pt")  # needs unpickling code: weights_only refuses
    with pytest.raises(WeightsError, match=r"module.pt' holds pickled Python objects \(torch.nn.modules.linear.Linear\), "
                       r"which are refused for safety.*plain state dict .*or a Lightning checkpoint") as caught:
        read_state_dict(tmp_path / "module.pt")
    message = str(caught.value)
    assert "\n" not in message  # one line, not torch's page of advice
    assert "weights_only=False" not in message and "add_safe_globals" not in message  # never advise loading it anyway


def test_a_truncated_or_garbage_checkpoint_is_one_line(tmp_path):
    net, _ = build_network("resnet18", num_classes=2)
    torch.save(net.state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all\n" * 10)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.ckpt"):
        with pytest.raises(WeightsError, match=f"model.weights='.*{name}' is not a readable checkpoint: .+") as caught:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400, str(caught.value)
    with pytest.raises(WeightsError, match="empty.ckpt' is not a readable checkpoint: the file is empty"):
        read_state_dict(tmp_path / "empty.ckpt")


@pytest.mark.parametrize("name", ["x.pt", "x.ckpt"])
def test_a_directory_is_not_a_checkpoint_file(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(WeightsError, match=f"model.weights='.*{name}' is a directory, not a checkpoint file"):
        read_state_dict(tmp_path / name)


def test_optimizer_gets_trainable_parameters_only():
    net, _ = build_network("resnet18", num_classes=2)
    for p in net.layer1.parameters():
        p.requires_grad_(False)
    module = sgd_classifier(net)
    optimizer = module.configure_optimizers()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in net.parameters() if p.requires_grad}
    trainable, total = count_parameters(net)
    assert trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable < total


def test_the_staged_alexnet_papers_small_cnn_has_the_shapes_and_parameters_of_its_table_1():
    from simfreeze.networks.layers import layer_map
    from simfreeze.networks.units import run_units, sequential_units

    net, record = build_network("small_cnn", num_classes=3)
    x = torch.randn(2, 3, 52, 52)
    assert net.features(x).shape == (2, 128, 7, 7) and net.pool(net.features(x)).shape == (2, 128, 3, 3)
    # Table 1's parameter counts (its BatchNorm rows also count the two running statistics)
    convs_and_dense = [1216, 4640, 18496, 73856, 590336, 262656, 1539]
    layers = layer_map(net, "small_cnn")
    assert [sum(p.numel() for n, p in net.named_parameters() if n.startswith(layer.name + "."))
            for layer in layers.layers] == convs_and_dense
    assert len(layers) == 7 and layers.l_total == 6 and record["head"] == "classifier.5"
    assert torch.equal(run_units(sequential_units(net), x), net(x))  # the prefix cache can run it
    with pytest.raises(WeightsError, match="small_cnn has no torchvision weights"):
        build_network("small_cnn", 3, weights="IMAGENET1K_V1")


def test_a_normal_head_init_is_khotsyanovskys_new_last_layer(tmp_path):
    source, _ = build_network("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    net, _ = build_network("resnet18", 2, weights=str(tmp_path / "source.pt"), head_init="normal")
    assert 0.008 < net.fc.weight.std().item() < 0.012 and not net.fc.bias.any()
    assert torch.equal(net.conv1.weight, source.conv1.weight)  # the body keeps the source's weights
    with pytest.raises(WeightsError, match="model.head_init=xavier must be null or normal"):
        build_network("resnet18", 2, head_init="xavier")
