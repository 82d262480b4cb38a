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
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

from hjepa.config import Config
from hjepa.data.augment import BatchAugment, to_float
from hjepa.data.buckets import TokenBuckets
from hjepa.data.deit3 import DeiT3Augment
from hjepa.data.masks import MultiBlockMaskSampler, sampler_from_config
from hjepa.data.multicrop import LocalCrops
from hjepa.models.hjepa import MaskIndices
from hjepa.train import distributed

_PREPARED_AHEAD = 4  # micro-batches whose masks prepare() keeps until their step takes them


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


def mask_preparer(cfg: Config, global_batch: int, pad_tokens: bool = False):
    """``prepare(micro) -> MaskIndices``: the mask indices of the whole global micro-batch
    ``micro`` (CPU), drawn from its own mask stream, exactly as a training step of ``cfg`` draws
    them (``pad_tokens``: padded as on an accelerator or under ``train.compile``)."""
    sampler, seed = sampler_from_config(cfg), cfg.train.seed
    buckets = TokenBuckets.for_sampler(sampler, global_batch) if pad_tokens else None

    return lambda micro: draw_mask_indices(sampler, buckets, seed, micro, global_batch)


def draw_mask_indices(
    sampler: MultiBlockMaskSampler,
    buckets: TokenBuckets | None,
    seed: int,
    micro: int,
    batch: int,
) -> MaskIndices:
    """The CPU mask indices of micro-batch ``micro`` (``batch`` images, its own mask stream),
    padded to ``buckets`` when given: the one draw both the step and the audit make."""
    index = MaskIndices.from_masks(sampler.sample(batch, _generator(seed, micro, Stream.MASKS)))
    return index if buckets is None else index.padded(buckets)


class InputPipeline:
    """Turns a micro-batch of uint8 images into model inputs: augmented view(s), mask indices
    and multi-crop local views, on ``device``.

    Args:
        cfg: the run's config (``data.*`` augmentation, ``masking.*``, ``train.seed``).
        mean, std: per-channel normalisation of the dataset.
        global_batch: images of one global micro-batch; one mask batch of that size is drawn
            at once (own generator, no stream moves), so mask settings that cannot be met on
            this grid fail before any compute instead of at some later step.
        pad_tokens: pad the mask indices to a few fixed token counts
            (:mod:`hjepa.data.buckets`; the model leaves the padding out of everything).
        cropped_in_loader: the images arrive already cropped and flipped (the loader's
            ``serves_train_crops``): the first view is only normalised.
    """

    def __init__(
        self,
        cfg: Config,
        mean: Tensor,
        std: Tensor,
        device: torch.device,
        dist: distributed.DistEnv,
        global_batch: int,
        pad_tokens: bool = False,
        cropped_in_loader: bool = False,
    ):
        d, a, mc = cfg.data, cfg.data.augment, cfg.data.multicrop
        self.seed, self.device, self.dist = cfg.train.seed, device, dist
        self.cropped_in_loader = cropped_in_loader
        self.masks = sampler_from_config(cfg)
        self.masks.sample(global_batch, torch.Generator().manual_seed(self.seed))
        self.global_batch = global_batch
        self.buckets = TokenBuckets.for_sampler(self.masks, global_batch) if pad_tokens else None
        self._prepared: dict[int, MaskIndices] = {}  # by micro-batch, drawn by prepare()
        stats = dict(mean=mean.flatten().tolist(), std=std.flatten().tolist())
        self.augment = BatchAugment(
            out_size=d.image_size,
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            flip_prob=d.hflip,
            **stats,
        )
        extra = DeiT3Augment.from_config(a, **stats)
        self.extra_augment = extra if extra.enabled else None  # DeiT III options, global view
        self.local_crops = (
            LocalCrops(mc.num_local, mc.local_size, mc.local_scale, d.crop_ratio, d.hflip, **stats)
            if mc.num_local
            else None
        )

    def prepare(self, micro: int) -> None:
        """Draw micro-batch ``micro``'s masks now, before its training step (the trainer's
        batch producer calls this): mask sampling reads values on the host, so the step that
        uses them then reads none. The draw is the one the step would make itself."""
        self._prepared[micro] = self._mask_indices(micro)
        while len(self._prepared) > _PREPARED_AHEAD:  # draws nobody took (a tool's own loop)
            del self._prepared[min(self._prepared)]

    def _mask_indices(self, micro: int, batch: int | None = None) -> MaskIndices:
        """This rank's mask indices of micro-batch ``micro`` (``batch`` images in all, default
        the global micro-batch), on the CPU (page-locked on CUDA)."""
        batch = self.global_batch if batch is None else batch
        # Indices are computed on the CPU: the forward pass then never syncs with the GPU.
        index = draw_mask_indices(self.masks, self.buckets, self.seed, micro, batch)
        index = index.rows(self.dist.shard())
        if self.device.type == "cuda":  # page-locked: the copy overlaps the GPU's work
            index = index.pin_memory()
        return index

    @property
    def shard(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    def __call__(self, images: Tensor, micro: int) -> tuple[Tensor, MaskIndices, Tensor | None]:
        """Augmented images, mask indices and multi-crop local views (None when off) of this
        rank's share of micro-batch ``micro``. Also seeds this rank's drop path for it."""
        seed = self.seed
        drop_path = distributed.rank_seed(step_seed(seed, micro, Stream.DROP_PATH), self.dist)
        torch.manual_seed(drop_path)
        raw = images.to(self.device, non_blocking=True)
        x = self._first_view(raw, micro)
        if self.extra_augment is not None:  # one augmented image feeds both encoders
            x = self.extra_augment(x, _generator(seed, micro, Stream.DEIT3), self.shard)
        views = None
        if self.local_crops is not None:
            views = self.local_crops(raw, _generator(seed, micro, Stream.LOCAL_CROPS), self.shard)
        index = self._prepared.pop(micro, None)
        batch = x.shape[0] * self.dist.world_size
        if index is None or batch != self.global_batch:  # not prepared (a tool's own call)
            index = self._mask_indices(micro, batch)
        return x, index.to(self.device, non_blocking=True), views

    def _first_view(self, raw: Tensor, micro: int) -> Tensor:
        """The view both encoders see, before the DeiT III options."""
        if self.cropped_in_loader:  # the workers drew its crop and flip
            return to_float(raw, self.augment.mean, self.augment.std)
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
