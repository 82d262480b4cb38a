"""``hjepa viz RUN_DIR``: PNGs of masks, attention, PCA of features and training curves.

Everything is drawn for the first ``num_images`` images of the run's test split, with the
trained target encoder of ``checkpoints/last.pt`` (or ``--checkpoint``) and masks drawn by the
run's own sampler from a generator seeded with ``seed``, so the same run gives the same
pictures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hjepa import checkpoint as ckpt
from hjepa.data.datasets import dataset_from_config
from hjepa.data.masks import sampler_from_config
from hjepa.data.normalize import channel_stats, to_input
from hjepa.eval.features import iter_batches
from hjepa.eval.runner import load_run_config, load_target_encoder
from hjepa.grid import grid_side
from hjepa.models.hjepa import build_encoder
from hjepa.rundir import checkpoint_path
from hjepa.train.logging import read_metrics
from hjepa.viz.attention import attention_summaries, last_block_attention, plot_attention
from hjepa.viz.common import display_images
from hjepa.viz.curves import plot_curves
from hjepa.viz.mask_plots import plot_masks
from hjepa.viz.pca import pca_rgb, plot_pca

PLOTS = ("masks", "attention", "pca", "curves")


def visualize_run(
    run_dir: str | Path,
    *,
    num_images: int = 4,
    seed: int = 0,
    query: int | None = None,
    only: Sequence[str] = PLOTS,
    out_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Path]:
    """Write the chosen plots to ``RUN_DIR/viz`` (or ``out_dir``); return their paths.

    ``checkpoint``: the weights drawn (default ``RUN_DIR/checkpoints/last.pt``).

    ``query`` is the level-0 token whose attention is shown (default: the grid centre).
    """
    unknown = sorted(set(only) - set(PLOTS))
    if unknown:
        raise ValueError(f"unknown plot(s) {unknown}; choose from {', '.join(PLOTS)}")
    if num_images < 1:
        raise ValueError(f"--images must be at least 1, got {num_images}")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "viz"
    cfg = load_run_config(run_dir)
    paths: dict[str, Path] = {}
    if "curves" in only:
        paths["curves"] = plot_curves(read_metrics(run_dir), out / "curves.png")
    if not set(only) - {"curves"}:
        return paths

    d, grid = cfg.data, grid_side(cfg.data.image_size, cfg.model.patch_size)
    test = dataset_from_config(cfg, "test")
    images = next(iter_batches(test, num_images))[0]
    shown = display_images(images, d.image_size)
    if "masks" in only:
        masks = sampler_from_config(cfg).sample(len(images), torch.Generator().manual_seed(seed))
        paths["masks"] = plot_masks(shown, masks, grid, out / "masks.png")
    if {"attention", "pca"} & set(only):
        source = checkpoint_path(run_dir, checkpoint)
        state = ckpt.load_checkpoint(source)
        channels = int(images.shape[1])
        encoder = build_encoder(cfg.model, d.image_size, channels)
        load_target_encoder(encoder, state, source, run_dir)
        encoder.eval()
        mean, std = channel_stats(d.name, channels)
        x = to_input(images, mean, std, d.image_size)
        if "attention" in only:
            q = grid * (grid // 2) + grid // 2 if query is None else query
            if not 0 <= q < grid * grid:
                raise ValueError(f"--query must be a token index in 0..{grid * grid - 1}")
            from_q, received = attention_summaries(last_block_attention(encoder, x), q)
            paths["attention"] = plot_attention(
                shown, from_q, received, grid, q, out / "attention.png"
            )
        if "pca" in only:
            with torch.no_grad():
                tokens = encoder(x)
            paths["pca"] = plot_pca(shown, pca_rgb(tokens, grid), out / "pca.png")
    return paths
