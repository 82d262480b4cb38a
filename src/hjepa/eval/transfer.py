"""Transfer datasets: probe a pretrained encoder on images it was never trained on.

``digits`` is scikit-learn's handwritten digits (1797 images of 8x8, 17 grey levels, 10
classes), split once into a fixed stratified 70/30 train/test split (seed 0 per class). The
images stay 8x8 uint8 here; feature extraction resizes them to the run's ``image_size`` like
any other image. ``image_folder:PATH`` is any ImageNet-layout folder
(``PATH/{train,val}/<class>/<image>``), decoded at the run's ``image_size``.

The encoder keeps its own input normalisation (the pretraining dataset's mean and std are part
of the encoder), and grey images are repeated to three channels for a colour encoder (colour
images are averaged to one channel for a grey encoder).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from hjepa.data.datasets import build_dataset
from hjepa.data.tensors import ImageTensors

DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


def digits_split(split: str) -> ImageTensors:
    """scikit-learn's digits as uint8 ``[N, 1, 8, 8]`` (0..16 scaled to 0..255), fixed split."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float() * (255.0 / 16.0)
    images = images.round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(10):  # stratified: 30 % of every class is test
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        test[members[: round(DIGITS_TEST_FRACTION * members.numel())]] = True
    keep = test if split == "test" else ~test
    return ImageTensors(images[keep], labels[keep], num_classes=10)


def match_channels(dataset: Dataset, channels: int) -> Dataset:
    """An in-memory dataset converted to ``channels`` (grey repeated, colour averaged)."""
    if not isinstance(dataset, ImageTensors) or dataset.channels == channels:
        return dataset
    images = dataset.images
    if dataset.channels == 1:
        images = images.expand(-1, channels, -1, -1).contiguous()
    elif channels == 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    else:
        raise ValueError(f"cannot convert {dataset.channels}-channel images to {channels}")
    return ImageTensors(images, dataset.labels, dataset.num_classes, dataset.classes)


def transfer_name(spec: str) -> str:
    """Short name of a transfer spec for tables and JSON keys."""
    kind, _, path = spec.partition(":")
    return "digits" if spec == "digits" else f"{kind}:{path.rstrip('/').split('/')[-1]}"


def transfer_datasets(spec: str, *, image_size: int, channels: int) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of a transfer spec: ``digits`` or ``image_folder:PATH``."""
    if spec == "digits":
        return (
            match_channels(digits_split("train"), channels),
            match_channels(digits_split("test"), channels),
        )
    kind, _, path = spec.partition(":")
    if kind != "image_folder" or not path:
        raise ValueError(f"transfer {spec!r}: use 'digits' or 'image_folder:PATH'")
    kw = dict(image_size=image_size, channels=channels)
    return (
        build_dataset("image_folder", path, "train", **kw),
        build_dataset("image_folder", path, "test", **kw),
    )
