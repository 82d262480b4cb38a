"""Stage 1 of a training step: the augmented views and the masks of one micro-batch.

Every random draw of a micro-batch comes from its own stream, a generator seeded by
``(train.seed, micro-batch number, stream)``, so a run resumed from a checkpoint draws exactly
what the uninterrupted run draws, and turning an option on moves no other stream.

Crops, flips and masks are drawn for the whole global micro-batch (the same numbers on every
rank) and each rank keeps its rows, so they depend only on a sample's global position.

When the loader's workers already cut the training view (an image folder: a random resized crop
and flip of the whole image, :mod:`hjepa.data.loader`), the first view is only normalised here;
the rest (DeiT III options, masks) is unchanged. The second view (VICReg / C-JEPA) and the
multi-crop local views are then cropped from that training view, not from the whole image.

The draws that read values on the host (mask sampling and index building; the first view's
crop boxes and flips when the pipeline cuts it) are :class:`InputDraws`, a pure function of the
micro-batch number: DataLoader workers make them ahead of the step
(:func:`hjepa.data.loader.draws_ahead`), and the step only applies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from hjepa.data.augment import BatchAugment
from hjepa.data.buckets import TokenBuckets
from hjepa.data.deit3 import DeiT3Augment
from hjepa.data.loader import draws_ahead
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.data.multicrop import LocalCrops
from hjepa.models.hjepa import MaskIndices
from hjepa.train import distributed

_PREPARED_AHEAD = 4  # micro-batches whose draws keep() holds until their step takes them


class Stream(IntEnum):
    """The random streams of a micro-batch. The values are part of the seeds: changing one
    changes every draw of that stream (and so every number of a run that uses it)."""

    CROP_FLIP = 0  # random resized crop + flip of the view both encoders see
    MASKS = 1  # multi-block target and context masks
    DROP_PATH = 2  # stochastic depth, per rank
    SECOND_CROP_FLIP = 3  # crop + flip of the second view (VICReg / C-JEPA)
    SECOND_DEIT3 = 4  # DeiT III pipeline of the second view
    DEIT3 = 5  # DeiT III pipeline of the first view
    LOCAL_CROPS = 6  # multi-crop local views


def step_seed(seed: int, micro: int, stream: Stream) -> int:
    """A distinct 63-bit seed per (run seed, micro-batch, stream)."""
    return ((seed * 1_000_003 + micro) * 8 + stream) % (2**63 - 1)


def _generator(seed: int, micro: int, stream: Stream) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, micro, stream))


def draw_mask_indices(
    sampler: MultiBlockMaskSampler,
    buckets: TokenBuckets | None,
    seed: int,
    micro: int,
    batch: int,
) -> MaskIndices:
    """The CPU mask indices of micro-batch ``micro`` (``batch`` images, its own mask stream),
    padded to ``buckets`` when given: the one draw of the step, its workers and the audit."""
    index = MaskIndices.from_masks(sampler.sample(batch, _generator(seed, micro, Stream.MASKS)))
    return index if buckets is None else index.padded(buckets)


@dataclass
class PreparedInputs:
    """What :class:`InputDraws` drew for micro-batch ``micro`` of ``batch`` images (the global
    micro-batch): this rank's mask indices and, when the first view is cut from images of
    ``image_hw`` after loading, this rank's crop boxes and flips of it. CPU tensors."""

    micro: int
    batch: int
    masks: MaskIndices
    crop: tuple[Tensor, Tensor] | None = None  # boxes [B, 4], flips bool [B]
    image_hw: tuple[int, int] | None = None  # the image size the crop was drawn for

    def pin_memory(self) -> PreparedInputs:
        """Page-locked copies (the DataLoader calls this): the copy to the GPU overlaps."""
        crop = None if self.crop is None else tuple(t.pin_memory() for t in self.crop)
        return dataclasses.replace(self, masks=self.masks.pin_memory(), crop=crop)


class InputDraws:
    """``draws(micro)``: the draws of micro-batch ``micro`` that read values on the host (mask
    sampling and index building, and the first view's crop boxes and flips when ``crop`` is
    given), as :class:`PreparedInputs`. A pure function of ``micro``: the DataLoader workers
    of :func:`hjepa.data.loader.draws_ahead` run it ahead of the step.

    Args:
        sampler: the multi-block mask sampler. One batch of ``global_batch`` is drawn now
            (own generator, no stream moves), so mask settings that cannot be met on this grid
            fail before any compute instead of at some later step.
        seed: the run seed (``train.seed``).
        global_batch: images of one global micro-batch.
        shard: ``(rank, world_size)``; a draw keeps rows ``rank::world_size``.
        buckets: pad the mask indices to these token counts (:mod:`hjepa.data.buckets`).
        crop: the first view's crop and flip, drawn here for images of ``image_hw``.
    """

    def __init__(
        self,
        sampler: MultiBlockMaskSampler,
        seed: int,
        global_batch: int,
        shard: tuple[int, int] = (0, 1),
        buckets: TokenBuckets | None = None,
        crop: BatchAugment | None = None,
        image_hw: tuple[int, int] | None = None,
    ):
        if (crop is None) != (image_hw is None):
            raise ValueError("InputDraws needs the image size (image_hw) exactly when it crops")
        sampler.sample(global_batch, torch.Generator().manual_seed(seed))
        self.sampler, self.seed, self.global_batch = sampler, seed, global_batch
        self.shard, self.buckets = shard, buckets
        self.crop, self.image_hw = crop, image_hw

    def __call__(
        self, micro: int, batch: int | None = None, image_hw: tuple[int, int] | None = None
    ) -> PreparedInputs:
        """The draws of micro-batch ``micro`` of ``batch`` images (default the global
        micro-batch), cropping images of ``image_hw`` (default the size given at
        construction)."""
        batch = self.global_batch if batch is None else batch
        rank, world = self.shard
        index = draw_mask_indices(self.sampler, self.buckets, self.seed, micro, batch)
        prepared = PreparedInputs(micro, batch, index.rows(slice(rank, None, world)))
        if self.crop is not None:
            hw = self.image_hw if image_hw is None else image_hw
            gen = _generator(self.seed, micro, Stream.CROP_FLIP)
            boxes, flip = self.crop.draw(batch, *hw, gen)
            prepared.crop, prepared.image_hw = (boxes[rank::world], flip[rank::world]), hw
        return prepared


class InputPipeline:
    """Turns a micro-batch of uint8 images into model inputs: augmented view(s), mask indices
    and multi-crop local views, on ``device``. Its parts come built (``build_parts``).

    Args:
        draws: the host-side draws of a micro-batch (masks, first-view crop).
        augment: crop, flip and normalisation of the views both encoders see.
        seed: the run seed (``train.seed``): the streams of every other draw.
        draw_workers: DataLoader workers that make the draws ahead (:meth:`prepared_from`);
            0 draws in this process, in the batch producer.
        extra_augment: the DeiT III options of the global views (None: off).
        local_crops: the multi-crop local views (None: off).
        cropped_in_loader: the images arrive already cropped and flipped (the loader's
            ``serves_train_crops``): the first view is only normalised.
    """

    def __init__(
        self,
        draws: InputDraws,
        augment: BatchAugment,
        seed: int,
        device: torch.device,
        dist: distributed.DistEnv,
        *,
        draw_workers: int = 0,
        extra_augment: DeiT3Augment | None = None,
        local_crops: LocalCrops | None = None,
        cropped_in_loader: bool = False,
    ):
        self.draws, self.augment, self.seed = draws, augment, seed
        self.device, self.dist, self.draw_workers = device, dist, draw_workers
        self.extra_augment, self.local_crops = extra_augment, local_crops
        self.cropped_in_loader = cropped_in_loader
        self._prepared: dict[int, PreparedInputs] = {}  # by micro-batch, from keep()

    def prepared_from(self, micro: int) -> Iterator[PreparedInputs]:
        """The draws of micro-batches ``micro``, ``micro + 1``, ..., made ahead by
        ``draw_workers`` DataLoader workers (in this process when 0): the trainer's batch
        producer hands each to :meth:`keep` with its images."""
        pin = self.device.type == "cuda"  # page-locked: the copy overlaps the GPU's work
        return draws_ahead(self.draws, micro, self.draw_workers, pin_memory=pin)

    def keep(self, prepared: PreparedInputs) -> None:
        """Hold ``prepared`` until the step of its micro-batch takes it."""
        self._prepared[prepared.micro] = prepared
        while len(self._prepared) > _PREPARED_AHEAD:  # draws nobody took (a tool's own loop)
            del self._prepared[min(self._prepared)]

    def _take_prepared(self, raw: Tensor, micro: int) -> PreparedInputs:
        """Micro-batch ``micro``'s draws: those kept for it when they fit these images, else
        drawn now (a tool that calls the pipeline itself, a batch of another size)."""
        batch, hw = raw.shape[0] * self.dist.world_size, (raw.shape[2], raw.shape[3])
        prepared = self._prepared.pop(micro, None)
        if prepared is not None and prepared.batch == batch and prepared.image_hw in (None, hw):
            return prepared
        prepared = self.draws(micro, batch, hw)
        return prepared.pin_memory() if self.device.type == "cuda" else prepared

    @property
    def shard(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    def __call__(self, images: Tensor, micro: int) -> tuple[Tensor, MaskIndices, Tensor | None]:
        """Augmented images, mask indices and multi-crop local views (None when off) of this
        rank's share of micro-batch ``micro``. Also seeds this rank's drop path for it."""
        seed = self.seed
        drop_path = distributed.rank_seed(step_seed(seed, micro, Stream.DROP_PATH), self.dist)
        torch.manual_seed(drop_path)
        prepared = self._take_prepared(images, micro)
        raw = images.to(self.device, non_blocking=True)
        x = self._first_view(raw, micro, prepared)
        if self.extra_augment is not None:  # one augmented image feeds both encoders
            x = self.extra_augment(x, _generator(seed, micro, Stream.DEIT3), self.shard)
        views = None
        if self.local_crops is not None:
            views = self.local_crops(raw, _generator(seed, micro, Stream.LOCAL_CROPS), self.shard)
        return x, prepared.masks.to(self.device, non_blocking=True), views

    def _first_view(self, raw: Tensor, micro: int, prepared: PreparedInputs) -> Tensor:
        """The view both encoders see, before the DeiT III options."""
        if self.cropped_in_loader:  # the workers drew its crop and flip
            return self.augment.normalize(raw)
        if prepared.crop is not None:  # drawn ahead, with the masks
            return self.augment.apply(raw, *prepared.crop)
        return self.augment(raw, _generator(self.seed, micro, Stream.CROP_FLIP), shard=self.shard)

    def second_view(self, images: Tensor, micro: int) -> Tensor:
        """Another augmentation of the same images (VICReg / C-JEPA): the crop, flip and DeiT
        III pipeline of the first view, from streams of its own, drawn for the global
        micro-batch like the first view. Moves no other random stream."""
        aug_gen = _generator(self.seed, micro, Stream.SECOND_CROP_FLIP)
        x = self.augment(images.to(self.device, non_blocking=True), aug_gen, shard=self.shard)
        if self.extra_augment is not None:
            x = self.extra_augment(x, _generator(self.seed, micro, Stream.SECOND_DEIT3), self.shard)
        return x
