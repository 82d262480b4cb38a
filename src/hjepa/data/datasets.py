"""The single entry point ``build_dataset``: one split of a named dataset.

Small datasets (Fashion-MNIST, CIFAR, synthetic) live in memory as one uint8
tensor :class:`~hjepa.data.tensors.ImageTensors` at their native resolution; the
batched augmentation resizes them on the fly. Large ones (an ImageNet-style folder)
are decoded lazily by :class:`~hjepa.data.image_folder.ImageFolder`, which
resizes at decode time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from hjepa.checkpoint import atomic_write
from hjepa.config import CHOICES, Config, ConfigError
from hjepa.data.cifar import load_cifar
from hjepa.data.decode import RandomResizedCrop
from hjepa.data.fashion_mnist import load_fashion_mnist
from hjepa.data.folder_index import DEFAULT_VAL_FRACTION, record_difference
from hjepa.data.image_folder import ImageFolder
from hjepa.data.synthetic import make_synthetic

DATASET_NAMES = CHOICES["data.name"]
SPLITS = ("train", "test")
DATASET_RECORD = "dataset.json"  # in a run dir: an image folder's classes and split


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    *,
    image_size: int,
    channels: int = 0,
    synthetic_size: int = 2048,
    seed: int = 0,
    class_subset: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    decoder: str = "pillow",
    train_crop: RandomResizedCrop | None = None,
) -> Dataset:
    """Build one split of a named dataset.

    Args:
        name: one of ``fashion_mnist``, ``cifar10``, ``cifar100``, ``image_folder``,
            ``synthetic``.
        root: directory (or archive) holding the data; ``None`` searches the default
            locations of each loader.
        split: ``train`` or ``test`` (``test`` is ImageNet's ``val`` for image folders).
        image_size: output side for ``image_folder`` (shorter side resized, then centre
            crop) and ``synthetic``; in-memory datasets keep their native size.
        channels: image channels for ``synthetic`` (0: 1) and ``image_folder`` (0: follow
            the files; 1 or 3: convert to grayscale or RGB); Fashion-MNIST (1) and CIFAR (3)
            keep their native channel count, so read ``dataset.channels`` rather than this
            argument.
        synthetic_size: number of training images of ``synthetic`` (the test split has
            a quarter of it, at least one per class).
        seed: seed of the synthetic data (train and test are drawn independently).
        class_subset: ``image_folder`` only: ``"imagenet100"`` or a file of class folder
            names, one per line.
        val_fraction: ``image_folder`` without ``val/`` only: the share of each class held
            out as the test split (:mod:`hjepa.data.folder_index`).
        decoder, train_crop: ``image_folder`` only: the JPEG decoder and the training view's
            random resized crop from the whole image (:mod:`hjepa.data.image_folder`).
    """
    folder_only = {"class_subset": class_subset, "train_crop": train_crop}
    _check_request(name, split, folder_only | {"decoder": None if decoder == "pillow" else decoder})
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, split, num_classes=10 if name == "cifar10" else 100)
    if name == "image_folder":
        if root is None:
            raise ValueError(
                "data.name=image_folder needs data.root: a folder with train/<class>/*.jpg "
                "and val/<class>/*.jpg (ImageNet layout)"
            )
        folder = {"class_subset": class_subset, "val_fraction": val_fraction}
        folder |= {"decoder": decoder, "train_crop": train_crop}
        return ImageFolder(root, split, image_size=image_size, channels=channels, **folder)
    return _synthetic(split, image_size, channels or 1, synthetic_size, seed)


def _check_request(name: str, split: str, folder_only: dict) -> None:
    """A known dataset and split, and no image-folder option (set, not None) for another set."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    for option, value in folder_only.items():
        if value is not None and name != "image_folder":
            raise ValueError(
                f"{option} applies only to data.name=image_folder, not {name!r}; unset it"
            )


def _synthetic(split: str, image_size: int, channels: int, size: int, seed: int) -> Dataset:
    """``synthetic``: ``size`` training images, a quarter of them (at least one per class) for
    the test split, drawn from distinct seeds so test images are not copies of training ones."""
    num_classes = 10
    n = size if split == "train" else max(size // 4, num_classes)
    split_seed = 2 * seed + (0 if split == "train" else 1)
    return make_synthetic(n, image_size, channels, num_classes=num_classes, seed=split_seed)


def dataset_from_config(cfg: Config, split: str) -> Dataset:
    """One split of the dataset a run's config names (``data.*`` and ``train.seed``). An image
    folder's training split also serves the training view (``data.crop_scale``,
    ``data.crop_ratio``, ``data.hflip``) to :class:`~hjepa.data.image_folder.CropKey` s."""
    d = cfg.data
    folder = {}
    if d.name == "image_folder":
        folder["decoder"] = d.decoder
        if split == "train":
            crop = (tuple(d.crop_scale), tuple(d.crop_ratio), d.hflip)
            folder["train_crop"] = RandomResizedCrop(*crop)
    return build_dataset(
        d.name,
        d.root or None,
        split,
        image_size=d.image_size,
        channels=d.channels,
        synthetic_size=d.synthetic_size,
        seed=cfg.train.seed,
        class_subset=d.class_subset or None,
        val_fraction=d.val_fraction,
        **folder,
    )


def resolve_channels(asked: int, root: str, dataset: Dataset) -> int:
    """The channels a run trains on: the dataset's, else ``asked`` (``data.channels``; 0 when
    unset), else 1. An ``asked`` value the image files under ``root`` contradict is refused."""
    files = getattr(dataset, "file_channels", None)
    if files is not None and asked and (asked == 3) != bool(files.colour):
        also = " (for grayscale training, convert the files first)" if asked == 1 else ""
        raise ConfigError(
            f"data.channels={asked} contradicts the images of {root}: "
            f"{files.describe()}; leave data.channels=0 to follow the files{also}"
        )
    return int(getattr(dataset, "channels", None) or asked or 1)


def dataset_record(dataset: Dataset) -> dict[str, Any] | None:
    """What ``dataset.json`` records of an image folder (classes, split, channels), else None."""
    index = getattr(dataset, "index", None)
    if index is None:
        return None
    files = dataset.file_channels
    seen = {
        "split": dataset.split,  # the headers read are this split's
        "gray": files.gray,
        "colour": files.colour,
        "images": files.total,
    }
    return {**index.record(), "channels": dataset.channels, "file_channels": seen}


def check_run_dataset(run_dir: str | Path, dataset: Dataset) -> dict[str, Any] | None:
    """:func:`dataset_record` of ``dataset``, refused (``ValueError``) when it is the folder
    ``run_dir`` recorded in ``dataset.json`` but its classes or held-out split changed since."""
    now = dataset_record(dataset)
    path = Path(run_dir) / DATASET_RECORD
    if now is None or not path.is_file():
        return now
    saved = json.loads(path.read_text())
    if saved.get("root") != now["root"]:
        return now  # another folder (extract's data.root override): nothing to compare
    change = record_difference(saved, now)
    if change:
        raise ValueError(
            f"{now['root']} is not the folder {run_dir} was trained on: {change}; restore it "
            f"as it was (the record is {path}), or train a new run.dir on it"
        )
    return now


def write_run_dataset(run_dir: str | Path, dataset: Dataset) -> None:
    """Write ``RUN_DIR/dataset.json`` for an image folder (atomically); nothing otherwise."""
    record = dataset_record(dataset)
    if record is not None:
        text = json.dumps(record, indent=1).encode()
        atomic_write(Path(run_dir) / DATASET_RECORD, lambda f: f.write(text), "dataset record")


def check_first_image(dataset: Dataset, name: str, channels: int) -> None:
    """Refuse a dataset whose images the model cannot take, before any compute is spent."""
    if len(dataset) == 0:
        raise ValueError(f"the {name} training set is empty; check data.root")
    image = dataset[0][0]
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.uint8
        or image.dim() != 3
        or image.shape[0] != channels
    ):
        is_tensor = isinstance(image, torch.Tensor)
        got = f"{image.dtype} {tuple(image.shape)}" if is_tensor else type(image).__name__
        fix = (
            f"set data.channels={image.shape[0]}"
            if is_tensor and image.dim() == 3 and image.dtype == torch.uint8
            else "make it return uint8 [C, H, W] tensors"
        )
        raise ValueError(
            f"the {name} dataset yields images of {got}, but the model takes uint8 "
            f"[{channels}, H, W]: {fix}"
        )
