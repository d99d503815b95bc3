"""Layer maps: the ordered, freezable layers of a network and how many of them may be frozen.

A *layer* is one convolution or linear map together with the normalisation that follows it
(its BatchNorm belongs to it). Counting this way, torchvision's ResNet-50 has exactly the 50 layers
of the paper: conv1, 16 bottlenecks × (conv1, conv2, conv3), fc. A ResNet block's ``downsample``
branch (1×1 conv + BN) is not counted: it belongs to the block's last conv (conv3 in a
bottleneck, conv2 in a basic block), whose output it is added to.

``L_total`` is the most layers a similarity plan may freeze. ResNets: everything up to the end of
``layer3`` (ResNet-50: 1 + 9 + 12 + 18 = 40, the paper's choice), so ``layer4`` and the head
always train. Other families: ``round(0.8 · layers)``, the paper's ResNet-50 share (40/50).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from simfreeze.errors import ConfigError

# Families with a layer map; the value says how L_total is chosen for them.
SUPPORTED_FAMILIES = {
    "resnet": "conv1..layer3", "wide_resnet": "conv1..layer3", "resnext": "conv1..layer3",
    "vgg": "0.8 of the layers", "alexnet": "0.8 of the layers", "densenet": "0.8 of the layers",
    "mobilenet": "0.8 of the layers", "efficientnet": "0.8 of the layers",
    "mnasnet": "0.8 of the layers", "regnet": "0.8 of the layers", "shufflenet": "0.8 of the layers",
    "googlenet": "0.8 of the layers", "small_cnn": "0.8 of the layers",
}
LAYER_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Layer:
    name: str                  # the conv / linear module, e.g. "layer1.0.conv1"
    modules: tuple[str, ...]   # every module whose parameters belong to this layer


@dataclass(frozen=True)
class LayerMap:
    arch: str
    layers: tuple[Layer, ...]
    l_total: int

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def family(arch: str) -> str | None:
    for name in sorted(SUPPORTED_FAMILIES, key=len, reverse=True):
        if arch.startswith(name):
            return name
    return None


def group_layers(net: nn.Module) -> list[Layer]:
    """Each conv / linear module starts a layer; parameterised modules after it (BatchNorm, …) join it.

    Parameterised modules before the first conv join the first layer.
    """
    groups: list[list[str]] = []
    leading: list[str] = []
    for name, module in net.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, LAYER_TYPES):
            groups.append([name])
        elif groups:
            groups[-1].append(name)
        else:
            leading.append(name)
    if not groups:
        raise ConfigError(f"{type(net).__name__} has no conv or linear layers to freeze")
    groups[0] = leading + groups[0]
    return [Layer(group[0], tuple(group)) for group in groups]


def merge_resnet_downsample(layers: list[Layer]) -> list[Layer]:
    """Fold each block's ``downsample`` conv + BN into the layer just before it (the block's last conv)."""
    merged: list[Layer] = []
    for layer in layers:
        if ".downsample." in layer.name and merged:
            merged[-1] = Layer(merged[-1].name, merged[-1].modules + layer.modules)
        else:
            merged.append(layer)
    return merged


def layer_map(net: nn.Module, arch: str, l_total: int | None = None) -> LayerMap:
    """The ordered layers of ``net`` (a torchvision ``arch``) and its ``L_total``."""
    kind = family(arch)
    if kind is None:
        raise ConfigError(f"model.arch='{arch}' has no layer map; supported families: "
                          f"{', '.join(sorted(SUPPORTED_FAMILIES))}")
    layers = group_layers(net)
    if kind in ("resnet", "wide_resnet", "resnext"):
        layers = merge_resnet_downsample(layers)
        default = sum(1 for layer in layers if not re.match(r"layer4\.|fc$", layer.name))
    else:
        default = round(0.8 * len(layers))
    if l_total is None:
        l_total = default
    if not 0 <= l_total < len(layers):
        raise ConfigError(f"freeze.l_total={l_total} must lie in [0, {len(layers) - 1}] for {arch} "
                          f"({len(layers)} layers; the last one, the head, always trains)")
    return LayerMap(arch, tuple(layers), l_total)
