"""Frozen features for the probes: per hierarchy level and concatenated, plus raw pixels."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hjepa.config import Config
from hjepa.data.normalize import to_input
from hjepa.data.tensors import ImageTensors
from hjepa.models.hjepa import level_features
from hjepa.models.vit import VisionTransformer, sincos_2d


def iter_batches(
    dataset: Dataset, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """The dataset in order, as ``(uint8 images, labels)`` batches; unreadable images dropped."""
    if isinstance(dataset, ImageTensors):
        for start in range(0, len(dataset), batch_size):
            stop = start + batch_size
            yield dataset.images[start:stop], dataset.labels[start:stop]
        return
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for images, labels in loader:
        keep = labels >= 0
        yield images[keep], labels[keep]


@torch.no_grad()
def encoder_features(
    encoder: VisionTransformer,
    dataset: Dataset,
    *,
    levels: int,
    mean: Tensor,
    std: Tensor,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    level_tokens: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per level ``l`` the mean over cells of the level's target representation.

    Returns ``({"level0": [N, D], ..., "concat": [N, levels*D]}, labels [N])``. Level ``l`` is
    exactly what the predictor is trained to predict at that level (2D-pooled, non-affine
    layer-normed tokens), averaged over the image. Features stay on ``device`` (the probes run
    there); labels are on the CPU. ``on_batch(images)`` is called after each batch (progress).
    ``level_tokens``, when given, is filled from the same pass with each level's tokens
    before the mean, ``{"level0": [N, N_0, D], ...}`` (the attentive probe's input).
    """
    encoder.eval()
    per_level: list[list[Tensor]] = [[] for _ in range(levels)]
    token_chunks: list[list[Tensor]] = [[] for _ in range(levels)]
    all_labels = []
    for images, labels in iter_batches(dataset, batch_size, num_workers):
        # Inference mode skips autograd's version counters and views (the same numbers);
        # the concatenation below, outside it, makes ordinary tensors the probes can fit on.
        with torch.inference_mode():
            x = to_input(images.to(device), mean, std, image_size)
            cells = level_features(encoder(x), encoder.grid_size, levels)
            pooled = mean_over_cells(cells)
        for lvl in range(levels):
            per_level[lvl].append(pooled[f"level{lvl}"])
            if level_tokens is not None:
                token_chunks[lvl].append(cells[lvl].float())
        all_labels.append(labels)
        if on_batch is not None:
            on_batch(images.shape[0])
    out = {f"level{lvl}": torch.cat(chunks) for lvl, chunks in enumerate(per_level)}
    if levels > 1:
        out["concat"] = concat_levels(out, levels)
    if level_tokens is not None:
        level_tokens.update({f"level{lvl}": torch.cat(c) for lvl, c in enumerate(token_chunks)})
    return out, torch.cat(all_labels)


def run_features(
    encoder: VisionTransformer,
    dataset: Dataset,
    cfg: Config,
    mean: Tensor,
    std: Tensor,
    device: torch.device | str,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    level_tokens: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`encoder_features` as a run's config sets it up (levels, image size, the eval batch
    size): one setting for the evaluation and the online probe alike."""
    return encoder_features(
        encoder,
        dataset,
        levels=cfg.model.levels,
        mean=mean,
        std=std,
        image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        device=device,
        num_workers=num_workers,
        on_batch=on_batch,
        level_tokens=level_tokens,
    )


def pooled_features(
    tokens: Tensor, grid_size: int, levels: int, *, concat: bool = True
) -> dict[str, Tensor]:
    """Level-0 tokens ``[B, N, D]`` -> ``{"level0": [B, D], ..., "concat": [B, levels*D]}``.

    The one definition of the pooled features the probes see (``hjepa eval``, the online
    kNN, :class:`hjepa.encoder.Encoder`). ``concat`` is left out with one level (it would be
    ``level0`` again) or when ``concat=False``.
    """
    out = mean_over_cells(level_features(tokens, grid_size, levels))
    if concat and levels > 1:
        out["concat"] = concat_levels(out, levels)
    return out


def mean_over_cells(cells: list[Tensor]) -> dict[str, Tensor]:
    """Per-level cells ``[B, N_l, D]`` -> ``{"level0": [B, D], ...}``, each level's mean."""
    return {f"level{lvl}": feats.mean(dim=1).float() for lvl, feats in enumerate(cells)}


def concat_levels(per_level: dict[str, Tensor], levels: int) -> Tensor:
    return torch.cat([per_level[f"level{lvl}"] for lvl in range(levels)], dim=1)


def pixel_features(
    dataset: Dataset, *, mean: Tensor, std: Tensor, image_size: int, batch_size: int = 2048
) -> tuple[Tensor, Tensor]:
    """Raw normalised pixels, flattened: the baseline every encoder must beat."""
    feats, labels = [], []
    for images, y in iter_batches(dataset, batch_size):
        feats.append(to_input(images, mean, std, image_size).flatten(1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, G*G, C*p*p]``: the non-overlapping ``p x p`` patches in
    row-major order, each flattened channel by channel (the layout of ``F.unfold``)."""
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def pixel_tokens(pixels: Tensor, channels: int, patch_size: int) -> Tensor:
    """Flattened normalised pixels ``[N, C*S*S]`` (:func:`pixel_features`) -> pixel tokens
    ``[N, G*G, C*p*p]``: the image's patches plus a fixed 2D sin-cos position code, so raw
    pixels reach the attentive probe as the encoder's tokens do (positions included).

    The code is :func:`sincos_2d` of the largest width divisible by 4, zero-padded to the
    patch width (``C*p*p`` need not be a multiple of 4).
    """
    side = math.isqrt(pixels.shape[1] // channels)
    patches = patchify(pixels.view(-1, channels, side, side), patch_size)
    grid, width = side // patch_size, patches.shape[-1]
    table = F.pad(sincos_2d(width - width % 4, grid), (0, width % 4))
    return patches + table.to(patches)
