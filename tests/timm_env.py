"""``timm``, importable beside the CPU build of torch (the dev extras pin both).

timm imports torchvision, and PyPI's torchvision 0.28.0 is a CUDA build: beside torch
2.13.0+cpu its C++ operators cannot load (they link libtorch_cuda), and ``import torchvision``
then fails on the two fake-kernel registrations it makes without checking that they loaded
(``nms``, ``qnms``). Declaring those two operator schemas first lets it import. Nothing calls
them (timm's ViTs use no torchvision operator); where the operators load, nothing is declared.
A missing timm is an ImportError here: the timm tests fail, they never skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_declared: list[torch.library.Library] = []  # a Library's definitions live as long as it does


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision (needed by timm) is not installed: pip install -e '.[dev]'")
    for lib in Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except OSError:
            return False
    return False


if not _torchvision_ops_load():
    _lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(_lib)

import timm  # noqa: E402  (after the declarations above)

__all__ = ["timm"]
