import pytest
import torchvision

from simfreeze.errors import ConfigError
from simfreeze.networks.layers import layer_map


def owned_modules(net, layers):
    owned = [m for layer in layers.layers for m in layer.modules]
    assert len(owned) == len(set(owned)), "a module belongs to two layers"
    with_params = {name.rpartition(".")[0] for name, _ in net.named_parameters()}
    # block maps also list the parameter-free modules of a block (dropout, stochastic depth)
    assert with_params <= set(owned) <= {name for name, _ in net.named_modules()}, \
        "every parameter belongs to exactly one layer"
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
    # by blocks: the stem, each block, the final norm with the head
    ("vit_b_16", 14, 11), ("swin_t", 14, 11), ("convnext_tiny", 20, 16),
])
def test_other_families_have_ordered_layers_and_a_default_l_total(arch, n_layers, l_total):
    net = torchvision.models.get_model(arch, num_classes=2)
    layers = layer_map(net, arch)
    owned_modules(net, layers)
    assert (len(layers), layers.l_total) == (n_layers, l_total)


def test_unknown_architecture_and_bad_l_total_are_clear_errors():
    with pytest.raises(ConfigError, match="supported families: .*resnet"):
        layer_map(torchvision.models.squeezenet1_0(num_classes=2), "squeezenet1_0")
    net = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ConfigError, match=r"freeze.l_total=18 must lie in \[0, 17\]"):
        layer_map(net, "resnet18", l_total=18)
    assert layer_map(net, "resnet18", l_total=5).l_total == 5


def test_a_block_structured_backbone_is_counted_by_blocks_with_every_module_in_one():
    from torchvision.models import VisionTransformer
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=2)
    layers = layer_map(vit, "vit_b_16")
    assert layers.names == ["stem", *(f"encoder.layers.encoder_layer_{i}" for i in range(3)), "heads"]
    assert {"", "conv_proj", "encoder", "encoder.dropout"} <= set(layers.layers[0].modules)  # class token, positions
    assert layers.layers[-1].modules == ("encoder.ln", "heads", "heads.head")
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=[2, 2], num_classes=2)
    layers = layer_map(swin, "swin_t")
    assert layers.names == ["stem", "features.1.0", "features.3.0", "features.3.1", "head"]
    assert "features.2" in layers.layers[2].modules  # patch merging: with the block that takes its output
    convnext = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=2)
    layers = layer_map(convnext, "convnext_tiny")
    assert layers.names == ["stem", "features.1.0", "features.1.1", "features.3.0", "classifier"]
    assert "features.2.1" in layers.layers[3].modules  # the downsample's conv
    for net, arch in ((vit, "vit_b_16"), (swin, "swin_t"), (convnext, "convnext_tiny")):
        owned = [name for layer in layer_map(net, arch).layers for name in layer.modules]
        assert sorted(owned) == sorted(name for name, _ in net.named_modules())  # every module in exactly one layer
