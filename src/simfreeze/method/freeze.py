"""Applying a freeze plan to a network: ``requires_grad`` per layer, frozen BatchNorm, dropout and
stochastic depth held in eval,
the plan's record (``plan.json``) and table, and the frozen state a checkpoint may leave out. Plain
torch: the run's callback (``simfreeze.runs.transfer``) and module (``simfreeze.runs.module``) call
these at the right moments of the fit."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from simfreeze.errors import ConfigError
from simfreeze.method.plan import FreezeSpec
from simfreeze.networks.layers import LayerMap


@dataclass(frozen=True)
class PlanRow:
    index: int        # 1-based, as in the paper's numbering
    name: str
    frozen: bool
    parameters: int


def plan_rows(net: nn.Module, layers: LayerMap, l_freeze: int) -> list[PlanRow]:
    def count(layer):
        return sum(p.numel() for m in layer.modules for p in net.get_submodule(m).parameters(recurse=False))
    return [PlanRow(i + 1, layer.name, i < l_freeze, count(layer)) for i, layer in enumerate(layers.layers)]


def frozen_modules(net: nn.Module, layers: LayerMap, l_freeze: int) -> list[nn.Module]:
    return [net.get_submodule(name) for layer in layers.layers[:l_freeze] for name in layer.modules]


def frozen_parameter_ids(net: nn.Module, layers: LayerMap, l_freeze: int) -> frozenset[int]:
    """Ids of the parameters a plan of ``l_freeze`` frozen layers would freeze (nothing is changed)."""
    return frozenset(id(p) for m in frozen_modules(net, layers, l_freeze) for p in m.parameters(recurse=False))


def acts_differently_in_training(module: nn.Module) -> bool:
    """BatchNorm (its running statistics), dropout and stochastic depth (torchvision's
    ``StochasticDepth``, timm's ``DropPath``): what makes a frozen layer's output depend on train mode."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)) or \
        type(module).__name__ in ("StochasticDepth", "DropPath")


def freeze_leading(net: nn.Module, layers: LayerMap, l_freeze: int) -> list[nn.Module]:
    """``requires_grad=False`` for the first ``l_freeze`` layers and every other layer trainable.

    Returns the frozen modules that act differently in training (BatchNorm, dropout, stochastic
    depth), which must stay in eval mode (see ``hold_eval``): a frozen layer's output is then a fixed
    function of its input, which the frozen-prefix cache relies on.
    """
    for i, layer in enumerate(layers.layers):
        for name in layer.modules:
            for p in net.get_submodule(name).parameters(recurse=False):
                p.requires_grad_(i >= l_freeze)
    held = [m for m in frozen_modules(net, layers, l_freeze) if acts_differently_in_training(m)]
    hold_eval(held)
    return held


def hold_eval(modules: list[nn.Module]) -> None:
    """Frozen BatchNorm must not update its running statistics, which train mode would do, and frozen
    dropout or stochastic depth must not drop.

    Runs before every training step: only a module put back in train mode is switched (switching
    all of ResNet-50's 49 frozen norms each step cost 0.1 ms of host time, checking them 2 µs)."""
    for module in modules:
        if module.training:  # leaves: no child to look at
            module.eval()


def plan_record(spec: FreezeSpec, layers: LayerMap, rows: list[PlanRow], l_freeze: int, score: float | None) -> dict:
    """What ``plan.json`` holds."""
    return {"arch": layers.arch, "policy": spec.policy, "score": score, "l_total": layers.l_total,
            "n_layers": len(layers), "l_freeze": l_freeze,
            "first_trainable": next((r.name for r in rows if not r.frozen), None),
            "layers": [asdict(r) for r in rows]}


def plan_markdown(spec: FreezeSpec, layers: LayerMap, rows: list[PlanRow], l_freeze: int) -> str:
    head = (f"policy **{spec.policy}**, L_freeze = **{l_freeze}** of {len(layers)} layers "
            f"(L_total {layers.l_total})\n\n| # | layer | frozen | parameters |\n|---|---|---|---|\n")
    return head + "\n".join(f"| {r.index} | {r.name} | {'yes' if r.frozen else ''} | {r.parameters:,} |"
                            for r in rows)


# The frozen state in checkpoints. A frozen layer's weights and BatchNorm statistics never change in
# a run (``requires_grad=False``; its BatchNorm held in eval), and the rebuilt network holds them
# again (they are the source's), so a checkpoint need not store them: it records their keys and a
# digest, and a restore takes them from the network as rebuilt after checking that digest.


def frozen_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` that a freeze holds fixed: every parameter with
    ``requires_grad=False``, and the buffers of a module whose own parameters (one at least) are all
    frozen. A module without parameters keeps its buffers: nothing says it is held in eval."""
    keys = []
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        if isinstance(value, nn.Parameter):
            frozen = not value.requires_grad
        else:
            owner = module.get_submodule(key.rpartition(".")[0])
            own = list(owner.parameters(recurse=False))
            frozen = bool(own) and not any(p.requires_grad for p in own)
        if frozen:
            keys.append(key)
    return keys


def state_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 of the named tensors: key, shape, dtype and values, independent of device and memory
    format."""
    digest = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def leave_out_frozen(state: dict[str, torch.Tensor], keys: list[str]) -> dict:
    """Removes ``keys`` from ``state`` (a checkpoint's ``state_dict``, in place) and returns the
    record a restore needs: the keys, their dtypes and a digest (strings only: ``weights_only``)."""
    record = {"keys": list(keys), "dtypes": [str(state[k].dtype).removeprefix("torch.") for k in keys],
              "digest": state_digest(state, keys)}
    for key in keys:
        del state[key]
    return record


def frozen_state_from(record: dict, current: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """The tensors ``record`` (``leave_out_frozen``) left out, taken from ``current`` (the state dict
    of the network as rebuilt) in the dtypes they were saved in; a ``ConfigError`` in one line if
    they are not the ones the checkpoint was written with (``source`` names the checkpoint)."""
    keys = record["keys"]
    missing = [k for k in keys if k not in current]
    if missing:
        raise ConfigError(f"{source} leaves out {len(keys)} frozen tensors, but the network as rebuilt has no "
                          f"{missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                          f"another architecture?")
    restored = {k: current[k].detach().to(getattr(torch, dtype)) for k, dtype in zip(keys, record["dtypes"])}
    if state_digest(restored, keys) != record["digest"]:
        raise ConfigError(f"{source} leaves out its frozen prefix ({len(keys)} tensors), and the one this run "
                          f"rebuilt from its source differs from it (digest mismatch): the source was retrained "
                          f"or other source weights given since the checkpoint was written")
    return restored
