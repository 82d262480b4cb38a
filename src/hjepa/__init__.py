"""hjepa: hierarchical Joint-Embedding Predictive Architecture for self-supervised learning.

``import hjepa`` stays light (no torch): :func:`load_encoder` (:mod:`hjepa.weights`) and
:class:`Encoder` (:mod:`hjepa.encoder`) are imported on first use.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("hjepa")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {"load_encoder": "hjepa.weights", "Encoder": "hjepa.encoder"}

__all__ = ["__version__", "load_encoder", "Encoder"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'hjepa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
