"""A disk cache of the evaluation baselines (raw pixels, the random-init encoder).

The baselines depend on the data, the architecture, the seed and the probe protocol, never on
training; recomputing them for every evaluated run costs as much as probing the trained encoder
twice. An entry is keyed by a hash of everything that can change their numbers:

* the evaluation data: a digest of the train/test images and labels (or, for datasets read
  from files, their root, size and class names), ``data.name``/``image_size``/``channels``;
* the random-init encoder: a digest of its very weights (architecture + seed + init code) and
  every ``model.*`` key the encoder's constructor reads (:class:`RecordedSection`: settings
  such as ``num_heads`` or ``pos_embed`` change the forward pass but no weight's shape),
  ``model.levels`` and ``model.attention``;
* the probe protocol: every ``eval.*`` key the baselines use, ``train.seed`` (the linear
  probe's validation split), :data:`PROTOCOL_VERSION`;
* the code: a digest of the source of the packages the numbers go through
  (:data:`CODE_PACKAGES`), so an edit to a probe, the encoder or the data pipeline can never
  be answered from an entry the old code wrote;
* the arithmetic: device type and model (the CPU's vector instruction set), the number of
  intra-op threads (the linear fits run on one thread whatever it is, see
  :mod:`hjepa.eval.linear`, but the feature pass and the kNN use them all, and no test can
  prove every kernel rounds alike at every count), torch and hjepa versions.

The key and its fields are recorded in ``eval.json`` (``baseline_cache``). A hit returns the
numbers a fresh computation gave, to the last digit; an entry is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hjepa.data.tensors import ImageTensors

#: Bump when the probes, the features or the baselines' definition change their numbers.
#: 2: the linear fits run on one intra-op thread (before: on all of them, whose count changed
#: the L-BFGS probe's accuracies in the last digits).
#: 3: the linear fits converge (float64, preconditioned, to a gradient tolerance) instead of
#: stopping at 100 iterations; the attentive probe's baselines join the entry.
#: 4: the weight-decay path stops at a looser tolerance and the refit starts in float32 (the
#: same minimum; a tie between decays on the held-out split may now fall the other way).
PROTOCOL_VERSION = 4
#: ``eval.*`` keys the baselines' numbers depend on.
EVAL_KEYS = (
    "knn_k",
    "knn_temperature",
    "batch_size",
    "train_limit",
    "linear",
    "low_shot",
    "low_shot_fractions",
    "low_shot_seeds",
    "transfer",
    "attentive",
    "attentive_epochs",
    "attentive_lrs",
    "attentive_weight_decays",
)


#: The subpackages and modules of hjepa whose source the baselines' numbers depend on.
CODE_PACKAGES = ("eval", "models", "data", "grid.py")


def code_digest() -> str:
    """Digest of the source of :data:`CODE_PACKAGES` (file names and contents)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=16)
    for name in CODE_PACKAGES:
        target = root / name
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def arithmetic(device: torch.device) -> dict[str, Any]:
    """What the same code and data can still round differently on: the device and its
    instruction set, the thread count, the library versions."""
    if device.type == "cuda":
        model = torch.cuda.get_device_name(device)
    else:
        model = torch.backends.cpu.get_cpu_capability()
    return {"device": device.type, "device_model": model, "threads": torch.get_num_threads()}


class RecordedSection:
    """A read-only view of a config section that records every field read through it.

    ``build_encoder(RecordedSection(cfg.model), ...)`` builds the very encoder and leaves in
    :attr:`read` exactly the settings it depends on, whatever they are now or become later.
    """

    def __init__(self, section: Any) -> None:
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "read", {})

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._section, name)
        self.read[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only (tried to set {name!r})")


def default_dir() -> Path:
    """``$HJEPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/hjepa``, else ``~/.cache/hjepa``."""
    if os.environ.get("HJEPA_CACHE_DIR"):
        return Path(os.environ["HJEPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hjepa"


def _digest_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # uint8/int64/float32 views of the raw bytes; numpy has no bfloat16, so go through int16.
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def dataset_digest(dataset: Dataset) -> str:
    """Content digest of an in-memory dataset; root, size and classes of a file dataset."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(dataset, ImageTensors):
        _digest_tensor(h, dataset.images)
        _digest_tensor(h, dataset.labels)
    else:
        described = {
            "type": type(dataset).__name__,
            "len": len(dataset),
            "root": str(getattr(dataset, "root", "")),
            "classes": list(getattr(dataset, "classes", None) or []),
        }
        h.update(json.dumps(described, sort_keys=True).encode())
    return h.hexdigest()


def state_digest(state: dict[str, Tensor]) -> str:
    """Digest of a state dict's names, shapes, dtypes and values."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        _digest_tensor(h, state[name])
    return h.hexdigest()


def baseline_key(fields: dict[str, Any]) -> str:
    """The entry name: a hash of the JSON of ``fields`` (sorted keys)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class BaselineCache:
    """``<dir>/eval-baselines/<key>/``: ``baselines.json`` (accuracies) and, when robustness
    needed it, ``pixel_classifier.pt`` (the pixel probe's standardiser and weights)."""

    def __init__(self, directory: str | Path, key: str, fields: dict[str, Any]) -> None:
        self.dir = Path(directory).expanduser() / "eval-baselines" / key
        self.key, self.fields = key, fields

    def load(self) -> dict[str, Any] | None:
        path = self.dir / "baselines.json"
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is recomputed and rewritten
        if entry.get("fields") != json.loads(json.dumps(self.fields, default=str)):
            return None  # a hash collision or a hand-edited entry: never trust it
        return entry["results"]

    def store(self, results: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        entry = {"key": self.key, "fields": self.fields, "results": results}
        _atomic_write(self.dir / "baselines.json", json.dumps(entry, indent=1, default=str))

    def load_tensors(self, name: str) -> dict[str, Tensor] | None:
        path = self.dir / f"{name}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed and rewritten
            return None

    def store_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.pt.tmp{os.getpid()}"
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.dir / f"{name}.pt")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
