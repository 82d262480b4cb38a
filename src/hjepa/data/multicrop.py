"""Multi-crop: small local views of each image for the view-prediction term.

Each of ``num_local`` views is an independent random resized crop (area fraction in
``local_scale`` of the source image, the run's aspect-ratio range and flip probability) resized
to ``local_size`` pixels. They are cut from the *raw* images, not from the augmented global view,
so a local crop is a genuinely different view of the same image (as in DINO / LeJEPA); for an
image folder the raw image is the training view the loader's workers cut from the whole image
(:mod:`hjepa.data.loader`), so local crops come from inside that view. The
DeiT III options (photometric, mixing, erasing) are not applied to them: mixing would make a
local crop of image ``i`` predict the embedding of a mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hjepa.data.augment import BatchAugment


class LocalCrops:
    """uint8 batch ``[B, C, H, W]`` -> normalised local views ``[V*B, C, s, s]``, view-major
    (rows ``v*B .. v*B + B - 1`` are view ``v`` of every image)."""

    def __init__(
        self,
        num_local: int,
        local_size: int,
        scale: Sequence[float] = (0.05, 0.4),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        if num_local < 1:
            raise ValueError(f"num_local must be >= 1, got {num_local}")
        self.num_local = num_local
        self.crop = BatchAugment(local_size, scale, ratio, flip_prob, mean, std)

    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor:
        """Each view's crops are drawn for the whole global batch and sliced (``shard``), so a
        sample gets the same local views whatever the number of ranks."""
        return torch.cat([self.crop(images, generator, shard) for _ in range(self.num_local)])

    def __repr__(self) -> str:
        return f"LocalCrops(num_local={self.num_local}, crop={self.crop!r})"
