"""Dataset container and the single entry point ``build_dataset``.

Small datasets (Fashion-MNIST, CIFAR, synthetic) live in memory as one uint8
tensor :class:`ImageTensors` at their native resolution; the batched
augmentation resizes them on the fly. Large ones (an ImageNet-style folder)
are decoded lazily by :class:`~hjepa.data.image_folder.ImageFolder`, which
resizes at decode time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from hjepa.config import Config

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic")
SPLITS = ("train", "test")


class ImageTensors(Dataset):
    """An in-memory image classification dataset.

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        labels: int64 tensor ``[N]`` with values in ``[0, num_classes)``.
        num_classes: number of classes; defaults to ``labels.max() + 1``.
        classes: optional human-readable class names (length ``num_classes``).

    ``dataset[i]`` returns ``(images[i], int(labels[i]))``. The loader indexes
    ``images`` directly in batches, so no per-sample Python work happens in training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} of shape "
                f"{tuple(images.shape)}"
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be a 1-D tensor with one entry per image ({images.shape[0]}), "
                f"got shape {tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"got {len(classes)} class names for {num_classes} classes")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.classes = (
            list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        )

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Native ``(H, W)`` of the stored images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageTensors(n={n}, channels={c}, size={h}x{w}, num_classes={self.num_classes})"


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
    # Imported here: the loaders import ImageTensors from this module.
    if name == "fashion_mnist":
        from hjepa.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(root, split)
    if name in ("cifar10", "cifar100"):
        from hjepa.data.cifar import load_cifar

        return load_cifar(root, split, num_classes=10 if name == "cifar10" else 100)
    if name == "image_folder":
        from hjepa.data.image_folder import ImageFolder

        if root is None:
            raise ValueError(
                "data.name=image_folder needs data.root: a folder with train/<class>/*.jpg "
                "and val/<class>/*.jpg (ImageNet layout)"
            )
        return ImageFolder(
            root, split, image_size=image_size, channels=channels, class_subset=class_subset
        )
    from hjepa.data.synthetic import make_synthetic

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
