"""The device a run computes on: ``train.device`` and ``train.precision`` resolved against the
visible hardware, and what that hardware cannot run refused up front."""

from __future__ import annotations

import torch

from hjepa.config import ConfigError, check_attention


def pick_device(name: str) -> torch.device:
    """``auto`` is the first of cuda, mps, cpu that is available; a named accelerator that is
    not visible is a :class:`ConfigError`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available; use train.device=auto")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" else "fp32"


def check_support(attention: str, device: torch.device, precision: str) -> None:
    """Refuse what ``device`` cannot run (config time saw only ``auto``): the attention kernel
    of ``model.attention`` (flash and cuDNN also need an Ampere or newer GPU) and fp16."""
    check_attention(attention, device.type, precision)
    if attention in ("flash", "cudnn") and torch.cuda.get_device_capability(device) < (8, 0):
        raise ConfigError(
            f"model.attention={attention} needs a CUDA GPU of compute capability >= 8.0 "
            "(Ampere or newer); use auto or efficient"
        )
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA GPU, not {device.type}")
