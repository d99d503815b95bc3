"""`trainer.precision=auto`: the numeric precision a device type runs fastest, chosen from
measurement rather than habit (docs/performance.md).

Measured per phase (``make bench``): on a CPU with native bf16 instructions (AVX512-BF16 / AMX),
bf16 autocast runs scratch training 1.5×, the similarity pass 1.8×, the cache fill 1.8× and the
cached tail's training 1.3× faster than fp32, so every phase runs bf16 there (the similarity pass
and the fill take the trainer's autocast); on a CPU without them (AVX2) oneDNN emulates bf16 5–30×
slower, so every phase runs fp32. On CUDA, bf16-mixed where the GPU supports it (Ampere and newer),
else 16-mixed.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from simfreeze.errors import ConfigError


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX).

    ``SIMFREEZE_NATIVE_BF16=0`` or ``1`` overrides the check, to run as on the other CPU kind
    (docs/testing.md). ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN itself act as an AVX2 CPU.
    """
    forced = os.environ.get("SIMFREEZE_NATIVE_BF16", "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError(f"SIMFREEZE_NATIVE_BF16={forced!r} must be 0 or 1")
        return forced == "1"
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN or without the check
        return False


def device_type(accelerator: str) -> str:
    """The device type Lightning's ``accelerator`` setting lands on: cuda, mps or cpu."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    if accelerator in ("auto", "gpu", "cuda") and CUDAAccelerator.is_available():
        return "cuda"
    if accelerator in ("auto", "gpu", "mps") and MPSAccelerator.is_available():
        return "mps"
    return "cpu" if accelerator in ("auto", "cpu") else str(accelerator)


def cuda_precision(capability: tuple[int, int]) -> str:
    """bf16 only where the GPU computes it natively (compute capability 8.0+: A100, H100, RTX 30xx…);
    V100 and T4 (7.x) would emulate it, much slower, so they get fp16 with loss scaling."""
    return "bf16-mixed" if capability >= (8, 0) else "16-mixed"


def default_precision(device: str) -> str:
    if device == "cuda":
        # not torch.cuda.is_bf16_supported(): by default it counts emulation, so V100 / T4 would say yes
        return cuda_precision(torch.cuda.get_device_capability())
    if device == "cpu" and native_cpu_bf16():
        return "bf16-mixed"
    return "32-true"


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` → the measured default of the device type; anything else is passed through."""
    return default_precision(device_type(accelerator)) if precision == "auto" else precision


def with_resolved_precision(cfg: dict) -> dict:
    """A run config as it runs: ``trainer.precision=auto`` → this device type's measured default, as
    results, source cache keys and resume checks record it."""
    trainer = cfg["trainer"]
    return {**cfg, "trainer": {**trainer, "precision": resolve_precision(trainer["precision"], trainer["accelerator"])}}


# oneDNN (torch 2.14.1, CPU) computes the bf16 weight gradient of a convolution whose stride
# exceeds its input's height or width from memory it never wrote: the same run twice gives other
# gradients, now and then inf (ResNet layer4 at 16×16 images: a stride-2 conv on a 1×1 map).
# Forward and input gradients are right. Such a convolution sees a few pixels at most, so running
# it in fp32 costs nothing measurable and makes bf16 runs reproducible.
class Fp32Conv2d(nn.Conv2d):
    """A Conv2d that runs in fp32 under autocast (see ``bf16_unsafe_convs``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            out = self._conv_forward(x.float(), self.weight.float(), bias)
        # bf16-true: the next layer's weights are bf16 too, and want its input so
        return out if self.weight.dtype == torch.float32 else out.to(self.weight.dtype)


def bf16_unsafe_convs(net: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the convolutions of ``net`` whose stride exceeds their input's height or width
    for inputs shaped like ``example`` (one forward in eval mode, without grad)."""
    found: list[str] = []

    def check(name):
        def hook(module, args):
            height, width = args[0].shape[-2:]
            stride_h, stride_w = module.stride
            if (stride_h > height or stride_w > width) and name not in found:
                found.append(name)
        return hook

    hooks = [module.register_forward_pre_hook(check(name)) for name, module in net.named_modules()
             if isinstance(module, nn.Conv2d)]
    modes = {module: module.training for module in net.modules()}
    try:
        with torch.no_grad():
            net.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
    return found


def run_in_fp32(net: nn.Module, names: list[str]) -> None:
    """Make the named ``nn.Conv2d`` modules run in fp32 under autocast; weights and state-dict
    keys stay as they are."""
    for name in names:
        module = net.get_submodule(name)
        if type(module) is nn.Conv2d:
            module.__class__ = Fp32Conv2d
