"""Frozen features for the probes: per hierarchy level and concatenated, plus raw pixels."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hjepa.config import Config
from hjepa.data.normalize import to_input
from hjepa.data.tensors import ImageTensors
from hjepa.models.hjepa import level_features
from hjepa.models.vit import VisionTransformer


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
) -> tuple[dict[str, Tensor], Tensor]:
    """Per level ``l`` the mean over cells of the level's target representation.

    Returns ``({"level0": [N, D], ..., "concat": [N, levels*D]}, labels [N])``. Level ``l`` is
    exactly what the predictor is trained to predict at that level (2D-pooled, non-affine
    layer-normed tokens), averaged over the image. Features stay on ``device`` (the probes run
    there); labels are on the CPU. ``on_batch(images)`` is called after each batch (progress).
    """
    encoder.eval()
    per_level: list[list[Tensor]] = [[] for _ in range(levels)]
    all_labels = []
    for images, labels in iter_batches(dataset, batch_size, num_workers):
        # Inference mode skips autograd's version counters and views (the same numbers);
        # the concatenation below, outside it, makes ordinary tensors the probes can fit on.
        with torch.inference_mode():
            x = to_input(images.to(device), mean, std, image_size)
            pooled = pooled_features(encoder(x), encoder.grid_size, levels, concat=False)
        for lvl in range(levels):
            per_level[lvl].append(pooled[f"level{lvl}"])
        all_labels.append(labels)
        if on_batch is not None:
            on_batch(images.shape[0])
    out = {f"level{lvl}": torch.cat(chunks) for lvl, chunks in enumerate(per_level)}
    if levels > 1:
        out["concat"] = concat_levels(out, levels)
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
    )


def pooled_features(
    tokens: Tensor, grid_size: int, levels: int, *, concat: bool = True
) -> dict[str, Tensor]:
    """Level-0 tokens ``[B, N, D]`` -> ``{"level0": [B, D], ..., "concat": [B, levels*D]}``.

    The one definition of the pooled features the probes see (``hjepa eval``, the online
    kNN, :class:`hjepa.encoder.Encoder`). ``concat`` is left out with one level (it would be
    ``level0`` again) or when ``concat=False``.
    """
    out = {
        f"level{lvl}": feats.mean(dim=1).float()
        for lvl, feats in enumerate(level_features(tokens, grid_size, levels))
    }
    if concat and levels > 1:
        out["concat"] = concat_levels(out, levels)
    return out


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
