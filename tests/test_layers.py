import pytest
import torchvision

from simfreeze.errors import ConfigError
from simfreeze.networks.layers import layer_map


def owned_modules(net, layers):
    owned = [m for layer in layers.layers for m in layer.modules]
    assert len(owned) == len(set(owned)), "a module belongs to two layers"
    with_params = {name.rpartition(".")[0] for name, _ in net.named_parameters()}
    assert set(owned) == with_params, "every parameter belongs to exactly one layer"
    return owned


def test_resnet50_has_the_papers_50_layers_and_l_total_40():
    net = torchvision.models.resnet50(num_classes=2)
    layers = layer_map(net, "resnet50")
    owned_modules(net, layers)
    assert len(layers) == 50 and layers.l_total == 40
    assert layers.names[0] == "conv1" and layers.names[-1] == "fc"
    assert layers.names[1:4] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"]
    assert layers.names[39] == "layer3.5.conv3" and layers.names[40] == "layer4.0.conv1"
    # each downsample branch belongs to its block's conv3
    assert layers.layers[3].modules == ("layer1.0.conv3", "layer1.0.bn3", "layer1.0.downsample.0",
                                        "layer1.0.downsample.1")
    assert layers.layers[0].modules == ("conv1", "bn1")


@pytest.mark.parametrize("arch, n_layers, l_total", [
    ("resnet18", 18, 13), ("resnet34", 34, 27), ("resnet101", 101, 91), ("vgg16", 16, 13), ("alexnet", 8, 6),
    ("mobilenet_v3_small", 54, 43), ("densenet121", 121, 97), ("efficientnet_b0", 82, 66),
])
def test_other_families_have_ordered_layers_and_a_default_l_total(arch, n_layers, l_total):
    net = torchvision.models.get_model(arch, num_classes=2)
    layers = layer_map(net, arch)
    owned_modules(net, layers)
    assert (len(layers), layers.l_total) == (n_layers, l_total)


def test_unknown_architecture_and_bad_l_total_are_clear_errors():
    with pytest.raises(ConfigError, match="supported families: .*resnet"):
        layer_map(torchvision.models.vit_b_16(num_classes=2), "vit_b_16")
    net = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ConfigError, match=r"freeze.l_total=18 must lie in \[0, 17\]"):
        layer_map(net, "resnet18", l_total=18)
    assert layer_map(net, "resnet18", l_total=5).l_total == 5
