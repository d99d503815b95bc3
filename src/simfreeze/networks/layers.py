"""Layer maps: the ordered, freezable layers of a network and how many of them may be frozen.

A *layer* is one convolution or linear map together with the normalisation that follows it
(its BatchNorm belongs to it). Counting this way, torchvision's ResNet-50 has exactly the 50 layers
of the paper: conv1, 16 bottlenecks × (conv1, conv2, conv3), fc. A ResNet block's ``downsample``
branch (1×1 conv + BN) is not counted: it belongs to the block's last conv (conv3 in a
bottleneck, conv2 in a basic block), whose output it is added to.

Block-structured backbones (torchvision's ViT, Swin and ConvNeXt) are counted by *blocks*, the unit
their authors and timm's ``group_matcher`` use: the stem (patch embedding, class token, position
embedding) is layer 1, each transformer or ConvNeXt block one layer, and the final norm with the head
the last. A downsampling step between stages (Swin's patch merging, ConvNeXt's downsample) belongs to
the block after it, which takes its output. torchvision's ViT-B/16: 1 + 12 + 1 = 14 layers; Swin-T:
1 + 12 + 1 = 14; ConvNeXt-T: 1 + 18 + 1 = 20. A block layer lists every module inside it, the
parameter-free ones too (dropout, stochastic depth), so that a frozen block can be held in evaluation
mode whole (``simfreeze.method.freeze``).

``L_total`` is the most layers a similarity plan may freeze. ResNets: everything up to the end of
``layer3`` (ResNet-50: 1 + 9 + 12 + 18 = 40, the paper's choice), so ``layer4`` and the head
always train. Other families: ``round(0.8 · layers)``, the paper's ResNet-50 share (40/50): ViT-B/16
11 of 14 (the last two blocks and the head train).
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
    "vit": "0.8 of the blocks", "swin": "0.8 of the blocks", "convnext": "0.8 of the blocks",
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


def block_roots(net: nn.Module, kind: str) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Per block, the module names it is made of (a downsampling step first, then the block), and the
    head's, for torchvision's block-structured families."""
    children = dict(net.named_children())
    if kind == "vit":
        blocks = [(f"encoder.layers.{name}",) for name, _ in net.encoder.layers.named_children()]
        return blocks, ("encoder.ln", "heads")
    # Swin and ConvNeXt: features = [stem, stage, downsample, stage, …]; a stage is a sequence of blocks
    blocks, pending = [], ()
    for index, stage in list(children["features"].named_children())[1:]:
        # a downsampling step (Swin's PatchMerging, ConvNeXt's LayerNorm2d + Conv2d): joins the next block
        if not isinstance(stage, nn.Sequential) or type(stage[0]).__name__ not in ("SwinTransformerBlock",
                                                                                   "SwinTransformerBlockV2", "CNBlock"):
            pending = (f"features.{index}",)
            continue
        for member, _ in stage.named_children():
            blocks.append((*pending, f"features.{index}.{member}"))
            pending = ()
    return blocks, (("norm", "head") if kind == "swin" else ("classifier",))


def block_layers(net: nn.Module, kind: str) -> list[Layer]:
    """The stem, one layer per block and the head (the norm before it included), each with every
    module inside it; modules that belong to no block or head (the stem's, containers) form the stem."""
    blocks, head = block_roots(net, kind)
    owner = {root: i for i, roots in enumerate(blocks) for root in roots}
    owner.update({root: len(blocks) for root in head})
    groups: list[list[str]] = [[] for _ in range(len(blocks) + 2)]  # stem, blocks…, head
    for name, _ in net.named_modules():
        parts = name.split(".") if name else []
        found = next((owner[".".join(parts[:k])] for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in owner), None)
        groups[0 if found is None else found + 1].append(name)
    names = ["stem", *(roots[-1] for roots in blocks), head[-1]]
    return [Layer(name, tuple(group)) for name, group in zip(names, groups)]


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
    layers = block_layers(net, kind) if kind in ("vit", "swin", "convnext") else group_layers(net)
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
