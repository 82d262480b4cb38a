"""The single entry point ``build_dataset``: one split of a named dataset.

Small datasets (Fashion-MNIST, CIFAR, synthetic) live in memory as one uint8
tensor :class:`~hjepa.data.tensors.ImageTensors` at their native resolution; the
batched augmentation resizes them on the fly. Large ones (an ImageNet-style folder)
are decoded lazily by :class:`~hjepa.data.image_folder.ImageFolder`, which
resizes at decode time.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from hjepa.config import CHOICES, Config
from hjepa.data.cifar import load_cifar
from hjepa.data.fashion_mnist import load_fashion_mnist
from hjepa.data.image_folder import ImageFolder
from hjepa.data.synthetic import make_synthetic

DATASET_NAMES = CHOICES["data.name"]
SPLITS = ("train", "test")


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    synthetic_size: int = 2048,
    seed: int = 0,
    class_subset: str | None = None,
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
        channels: image channels for ``synthetic`` and ``image_folder`` (1 or 3);
            Fashion-MNIST (1) and CIFAR (3) keep their native channel count, so read
            ``dataset.channels`` rather than this argument.
        synthetic_size: number of training images of ``synthetic`` (the test split has
            a quarter of it, at least one per class).
        seed: seed of the synthetic data (train and test are drawn independently).
        class_subset: ``image_folder`` only: ``"imagenet100"`` or a file of class folder
            names, one per line.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if class_subset is not None and name != "image_folder":
        raise ValueError(
            f"class_subset applies only to data.name=image_folder, not {name!r}; unset it"
        )
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
        return ImageFolder(
            root, split, image_size=image_size, channels=channels, class_subset=class_subset
        )
    num_classes = 10
    n = synthetic_size if split == "train" else max(synthetic_size // 4, num_classes)
    # Distinct seeds so the test images are not copies of training images.
    split_seed = 2 * seed + (0 if split == "train" else 1)
    return make_synthetic(n, image_size, channels, num_classes=num_classes, seed=split_seed)


def dataset_from_config(cfg: Config, split: str) -> Dataset:
    """One split of the dataset a run's config names (``data.*`` and ``train.seed``)."""
    d = cfg.data
    return build_dataset(
        d.name,
        d.root or None,
        split,
        image_size=d.image_size,
        channels=d.channels,
        synthetic_size=d.synthetic_size,
        seed=cfg.train.seed,
        class_subset=d.class_subset or None,
    )


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
