"""``hjepa extract RUN_DIR --split train|test --out FILE.npz``: frozen features of a split.

The features are those ``hjepa eval`` probes (:class:`hjepa.encoder.Encoder`, the same pooling
and normalisation), for every readable image of the split in dataset order: ``features``
``[N, D']`` float32 and ``labels`` ``[N]`` int64 in one ``.npz``. The data is the run's own
unless ``data.*`` overrides name another (its images are resized to the encoder's size and
normalised with the run's statistics, as ``hjepa eval``'s transfer probes do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hjepa import checkpoint as ckpt
from hjepa.data.datasets import dataset_from_config
from hjepa.device import pick_device
from hjepa.encoder import CONCAT
from hjepa.eval.features import iter_batches
from hjepa.eval.runner import load_run_config
from hjepa.load import load_encoder
from hjepa.rundir import checkpoint_path

SPLITS = ("train", "test")
# What extract may override: the data read, and how it is batched and where it runs.
OVERRIDABLE = ("data.", "eval.batch_size", "train.device", "train.num_workers")


def extract_features(
    run_dir: str | Path,
    split: str,
    out: str | Path,
    *,
    level: str = CONCAT,
    checkpoint: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (``features``, ``labels``) atomically; returns a summary of what it holds."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out} must end in .npz")
    cfg = load_run_config(run_dir, overrides, allowed=OVERRIDABLE)
    device = pick_device(cfg.train.device)
    source = checkpoint_path(run_dir, checkpoint)
    encoder = load_encoder(source, map_location=device)
    encoder.feature_dim(level)  # an unknown level fails before any image is read
    dataset = dataset_from_config(cfg, split)
    channels = int(getattr(dataset, "channels", encoder.channels))
    if channels != encoder.channels:
        raise ValueError(
            f"the {cfg.data.name} {split} images have {channels} channel(s), the encoder takes "
            f"{encoder.channels}: set data.channels={encoder.channels} or use another dataset"
        )
    batch_size = cfg.eval.batch_size
    batches = iter_batches(dataset, batch_size, cfg.train.num_workers)
    from tqdm import tqdm

    bar = tqdm(
        batches,
        total=math.ceil(len(dataset) / batch_size),
        desc=f"extract {split}",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    features, labels = [], []
    with torch.no_grad():
        for images, y in bar:
            features.append(encoder.features(images.to(device), level).cpu())
            labels.append(y)
    feats = torch.cat(features).numpy().astype(np.float32, copy=False)
    labs = torch.cat(labels).numpy().astype(np.int64, copy=False)
    ckpt.atomic_write(out, lambda f: np.savez(f, features=feats, labels=labs), "features")
    return {
        "out": str(out),
        "checkpoint": str(source),
        "step": encoder.step,
        "split": split,
        "level": level,
        "images": int(feats.shape[0]),
        "dim": int(feats.shape[1]),
    }


__all__ = ["extract_features", "SPLITS"]
