"""`trainer.precision=auto`: the numeric precision a device type runs fastest, chosen from
measurement rather than habit (README, Performance).

Measured: bf16 autocast trains ResNet-50 in about 0.75× the fp32 time on a CPU with native bf16
instructions (AVX512-BF16 / AMX), but many times slower on one without them (AVX2), where oneDNN
emulates it. On CUDA, bf16-mixed where the GPU supports it (Ampere and newer), else 16-mixed.
"""

from __future__ import annotations

import torch


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
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


def default_precision(device: str) -> str:
    if device == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device == "cpu" and native_cpu_bf16():
        return "bf16-mixed"
    return "32-true"


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` → the measured default of the device type; anything else is passed through."""
    return default_precision(device_type(accelerator)) if precision == "auto" else precision

