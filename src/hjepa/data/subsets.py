"""Reproducible subsets of a dataset (the online probe's and the evaluation's fixed samples)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from hjepa.data.tensors import ImageTensors


def fixed_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """A reproducible random subset of ``size`` items (all of them when ``size`` is larger)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    index = index.sort().values
    if isinstance(dataset, ImageTensors):
        return ImageTensors(
            dataset.images[index], dataset.labels[index], dataset.num_classes, dataset.classes
        )
    return Subset(dataset, index.tolist())
