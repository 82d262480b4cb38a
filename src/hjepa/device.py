"""The device a run computes on: ``train.device`` resolved against the visible hardware."""

from __future__ import annotations

import torch

from hjepa.config import ConfigError


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
