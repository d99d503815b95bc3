"""Networks by torchvision name (or our own) with a task-sized head and their initial weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from simfreeze.errors import ConfigError, WeightsError


def classifier_head_name(net: nn.Module) -> str:
    """Dotted name of the classifier head: the last ``nn.Linear`` in module order."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(net).__name__} has no nn.Linear classifier head to replace")
    return linears[-1]


def replace_head(net: nn.Module, num_classes: int) -> str:
    """Swap the classifier head for a fresh ``nn.Linear(in_features, num_classes)``."""
    name = classifier_head_name(net)
    old = net.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


# A run's checkpoint that leaves out its frozen state records it under this key (simfreeze.method.freeze).
FROZEN_STATE = "frozen_state"


def read_state_dict(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A plain state dict, or the network's weights inside a Lightning checkpoint (``net.`` keys).
    ``key`` is the config key the path came from, for the error messages, each one line."""
    loaded = load_checkpoint(path, key)
    path = Path(path).expanduser()
    if isinstance(loaded, dict) and isinstance(loaded.get(FROZEN_STATE), dict):
        raise WeightsError(f"{key}='{path}' leaves out its frozen prefix ({len(loaded[FROZEN_STATE]['keys'])} tensors, "
                           f"which its run takes from its source), so it is not whole weights: give the source's, "
                           f"or train that run with checkpoint.keep_frozen=true")
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = {k.removeprefix("net."): v for k, v in loaded["state_dict"].items() if k.startswith("net.")}
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{key}='{path}' does not hold a state dict of tensors")
    return loaded


def load_checkpoint(path: str | Path, key: str, mmap: bool = False):
    """Whatever ``path`` holds, read with ``weights_only=True`` (``mmap``: tensors stay on disk until
    used, for a quick look); one line naming ``key`` when it cannot be read."""
    import re

    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(f"{key}='{path}' is a directory, not a checkpoint file")
    if not path.is_file():
        raise WeightsError(f"{key}='{path}': no such checkpoint file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{key}='{path}' is not a readable checkpoint: the file is empty")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickled objects refused, truncated files, garbage
        text = str(err)
        # torch's weights_only refusal is a page of advice (some of it unsafe: never passed on); its
        # one telling line names the global, e.g. "Unsupported global: GLOBAL torch.nn.modules.linear.Linear"
        blocked = re.search(r"unsupported global:?\s*(?:global\s+)?([\w.]+)", text, re.IGNORECASE)
        if blocked:
            raise WeightsError(f"{key}='{path}' holds pickled Python objects ({blocked.group(1)}), which are "
                               f"refused for safety (unpickling them could run code from the file); give a plain "
                               f"state dict (torch.save(net.state_dict(), path)) or a Lightning checkpoint "
                               f"instead") from err
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # garbage read as a pickle
        if isinstance(err, EOFError):
            reason = "the file ends early (truncated?)"
        elif unpickler:
            reason = f"not a torch.save file ({unpickler.group(1).strip().rstrip('.')[:200]})"
        else:  # the first sentence of torch's first line: the rest is advice or internals
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            first = first.split(". ")[0].rstrip(".")[:200]
            reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise WeightsError(f"{key}='{path}' is not a readable checkpoint: {reason}") from err
    return loaded


def load_backbone(net: nn.Module, state: dict[str, torch.Tensor], head: str) -> list[str]:
    """Load every non-head weight strictly; return the head keys that were dropped."""
    dropped = sorted(k for k in state if k.startswith(head + "."))
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(head + ".")}
    missing = sorted(set(expected) - set(body))
    unexpected = sorted(set(body) - set(expected))
    mismatched = sorted(f"{k} {tuple(v.shape)}≠{tuple(expected[k].shape)}"
                        for k, v in body.items() if k in expected and v.shape != expected[k].shape)
    if missing or unexpected or mismatched:
        def some(keys):
            return ", ".join(keys[:6]) + (f" … (+{len(keys) - 6})" if len(keys) > 6 else "")
        parts = [f"{label}: {some(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise WeightsError("checkpoint does not fit the architecture — " + "; ".join(parts))
    net.load_state_dict(body, strict=False)
    return dropped


class SmallCNN(nn.Module):
    """The staged AlexNet paper's CNN (its Table 1): four convolutions 16→32→64→128, the first two
    with BatchNorm, max pooling after the 2nd and the 4th, then dense 512 → 512 → classes.

    At ``data.image_size=52`` the shapes are the table's (48² → 24² → 22² → 11² → 9² → 7² → 3²,
    1,152 features). The last pooling is adaptive to 3×3 so other input sizes work too.
    ``units()`` gives its forward as a chain (the frozen-prefix cache runs it unit by unit).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveMaxPool2d(3)
        self.classifier = nn.Sequential(
            nn.Flatten(1), nn.Linear(128 * 3 * 3, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    def units(self) -> list[tuple[str, nn.Module]]:
        return [*((f"features.{i}", m) for i, m in enumerate(self.features)), ("pool", self.pool),
                *((f"classifier.{i}", m) for i, m in enumerate(self.classifier))]


# Architectures of the papers that torchvision does not have, by ``model.arch`` name.
OWN_ARCHS: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN}


def init_head(net: nn.Module, head: str, how: str | None) -> None:
    """``normal``: the head's weights from N(0, 0.01²) and zero bias (Khotsyanovsky's new last layer);
    None keeps the architecture's own initialisation."""
    if how is None:
        return
    if how != "normal":
        raise WeightsError(f"model.head_init={how} must be null or normal")
    layer = net.get_submodule(head)
    nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def build_network(arch: str, num_classes: int, weights: str | None = None, key: str = "model.weights",
                  head_init: str | None = None, **kwargs: Any) -> tuple[nn.Module, dict]:
    """A torchvision classifier (or one of ``OWN_ARCHS``) with a ``num_classes`` head.

    ``weights``: None (random init), a torchvision weights enum name such as ``IMAGENET1K_V2``
    (downloaded by torchvision), or a path to a state dict / Lightning checkpoint.
    Returns the network and a record of what was loaded.
    """
    from torchvision import models

    available = [*models.list_models(module=models), *OWN_ARCHS]
    if arch not in available:
        raise WeightsError(f"model.arch='{arch}' is not a torchvision classification model; "
                           f"choose one of: {', '.join(sorted(available))}")
    record: dict[str, Any] = {"arch": arch, "weights": weights, "dropped_head_keys": []}
    if weights and not _looks_like_path(weights) and arch in OWN_ARCHS:
        raise WeightsError(f"{key}='{weights}': {arch} has no torchvision weights; give a checkpoint path")
    if weights and not _looks_like_path(weights):
        try:
            enum = models.get_model_weights(arch)[weights]
        except KeyError:
            names = [w.name for w in models.get_model_weights(arch)]
            raise WeightsError(f"{key}='{weights}' is neither a file nor one of "
                               f"{arch}'s torchvision weights {names}") from None
        try:
            net = models.get_model(arch, weights=enum, **kwargs)
        except (TypeError, ValueError) as err:  # the constructor's refusal, not the download's
            raise model_kwargs_error(arch, kwargs, err) from None
        except Exception as err:  # offline: URLError and friends
            raise WeightsError(f"could not fetch torchvision weights {arch}.{weights}: {err}. "
                               f"Offline, pass a local file as {key}=/path/to/state_dict.pt") from err
        record["head"] = replace_head(net, num_classes)
        init_head(net, record["head"], head_init)
        return net, record
    try:
        if arch in OWN_ARCHS:
            net = OWN_ARCHS[arch](num_classes=num_classes, **kwargs)
        else:
            net = models.get_model(arch, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise model_kwargs_error(arch, kwargs, err) from None
    head = classifier_head_name(net)
    if net.get_submodule(head).out_features != num_classes:  # archs that ignore num_classes
        replace_head(net, num_classes)
    record["head"] = head
    if weights:
        state = read_state_dict(weights, key)
        try:
            record["dropped_head_keys"] = load_backbone(net, state, head)
        except WeightsError as err:
            raise WeightsError(f"{key}='{weights}': {err} ({arch})") from None
    init_head(net, head, head_init)  # after loading: the head is new whatever the weights held
    return net, record


def model_kwargs_error(arch: str, kwargs: dict, err: Exception) -> ConfigError:
    """A ``model.kwargs`` the constructor refuses (an unknown argument, a value out of its range),
    as one line with torch's or torchvision's reason instead of a traceback."""
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    return ConfigError(f"model.kwargs={kwargs}: {arch} refuses them: {reason}")


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\")) or value.endswith((".pt", ".pth", ".ckpt", ".bin"))


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(net.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
