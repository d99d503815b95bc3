"""A network as a chain of *units* whose composition is its forward (ResNet: conv1, bn1, relu,
maxpool, each residual block, avgpool, flatten, fc), so that a leading part can run on its own."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

Unit = tuple[str, nn.Module]


def sequential_units(net: nn.Module) -> list[Unit] | None:
    """The chain of units of a torchvision ResNet / VGG / AlexNet / MobileNet / EfficientNet, or of
    a network that gives its own (``net.units()``, e.g. SmallCNN); None for networks whose forward
    is not such a chain."""
    from torchvision import models

    if isinstance(net, models.ResNet):
        units: list[Unit] = [(name, getattr(net, name)) for name in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(net, stage))]
        return units + [("avgpool", net.avgpool), ("flatten", nn.Flatten(1)), ("fc", net.fc)]
    if isinstance(net, (models.VGG, models.AlexNet, models.MobileNetV2, models.MobileNetV3, models.EfficientNet)):
        units = [(f"features.{i}", m) for i, m in enumerate(net.features)]
        units += [("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
        return units + [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)]
    if callable(getattr(net, "units", None)):
        return list(net.units())
    return None


def run_units(units: Iterable[Unit], x: torch.Tensor) -> torch.Tensor:
    for _, unit in units:
        x = unit(x)
    return x
