"""Draw docs/img/method.png: one real mask sample per level, and the training step as a diagram.

The masks come from hjepa's own sampler on the quickstart's 7×7 grid (patch 4 on a 28 px
Fashion-MNIST test image), so the picture shows what training sees, not an illustration.

    PYTHONPATH=src python docs/img/make_method_figure.py [--root FASHION_MNIST_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from hjepa.data.fashion_mnist import load_fashion_mnist
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.viz.mask_plots import cells_to_tokens

IMAGE_SIZE, PATCH, LEVELS = 28, 4, 3
GRID = IMAGE_SIZE // PATCH
BLOCK_COLOURS = ["#d62728", "#1f77b4", "#ff7f0e", "#9467bd"]
CONTEXT_COLOUR = "#2ca02c"


def sample_masks(seed: int):
    sampler = MultiBlockMaskSampler(GRID, levels=LEVELS)
    return sampler.sample(1, torch.Generator().manual_seed(seed))


def shade(ax, token_mask: torch.Tensor, colour: str, alpha: float) -> None:
    """Fill the patches of a ``[GRID²]`` token mask."""
    for index in token_mask.nonzero().flatten().tolist():
        row, col = divmod(index, GRID)
        ax.add_patch(
            Rectangle(
                (col * PATCH - 0.5, row * PATCH - 0.5), PATCH, PATCH, color=colour, alpha=alpha
            )
        )


def outline(ax, token_mask: torch.Tensor, colour: str, style: str = "-") -> None:
    """The bounding box of a ``[GRID²]`` token mask (a target block is a rectangle)."""
    rows, cols = token_mask.view(GRID, GRID).nonzero().unbind(1)
    top, left = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
    corner = (left * PATCH - 0.5, top * PATCH - 0.5)
    ax.add_patch(
        Rectangle(corner, width * PATCH, height * PATCH, fill=False, ec=colour, lw=2, ls=style)
    )


def grid_lines(ax, cell: int, colour: str = "white", width: float = 0.6) -> None:
    for k in range(0, IMAGE_SIZE + 1, cell):
        ax.axhline(min(k, IMAGE_SIZE) - 0.5, color=colour, lw=width)
        ax.axvline(min(k, IMAGE_SIZE) - 0.5, color=colour, lw=width)


def image_panel(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=-110, vmax=255)  # black shows as grey: colours stay legible
    ax.set_xlim(-0.5, IMAGE_SIZE - 0.5)
    ax.set_ylim(IMAGE_SIZE - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def draw_masks(fig: Figure, image: np.ndarray, masks) -> None:
    panels = fig.subplots(
        1,
        2 + LEVELS,
        gridspec_kw={"left": 0.02, "right": 0.98, "top": 0.93, "bottom": 0.52, "wspace": 0.08},
    )
    image_panel(panels[0], image, f"image: {GRID}×{GRID} patches of {PATCH}×{PATCH} px")
    grid_lines(panels[0], PATCH)

    context = masks.context[0]
    image_panel(panels[1], image, f"context: {int(context.sum())} tokens (encoder input)")
    shade(panels[1], context, CONTEXT_COLOUR, 0.55)
    grid_lines(panels[1], PATCH)
    for block, colour in enumerate(BLOCK_COLOURS):  # removed from the context
        outline(panels[1], masks.targets[0, block], colour, style=":")

    for level in range(LEVELS):
        ax = panels[2 + level]
        side = -(-GRID // 2**level)
        image_panel(ax, image, f"level {level} targets ({side}×{side} cells)")
        for block, colour in enumerate(BLOCK_COLOURS):
            cells = masks.level_targets[level][0, block]
            shade(ax, cells_to_tokens(cells, GRID, level), colour, 0.4)
        grid_lines(ax, PATCH * 2**level, width=1.0 if level else 0.6)
        for block, colour in enumerate(BLOCK_COLOURS):  # the level-0 block each level covers
            outline(ax, masks.targets[0, block], colour)


def box(ax, x: float, y: float, text: str, colour: str, width: float = 15.0) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - 3.2),
            width,
            6.4,
            boxstyle="round,pad=0.4",
            fc=colour,
            ec="#444444",
            lw=0.8,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def arrow(ax, start, end, style: str = "-|>", dashed: bool = False) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=10,
            lw=1.0,
            color="#333333",
            linestyle="--" if dashed else "-",
            shrinkA=0,
            shrinkB=0,
        )
    )


def draw_step(fig: Figure) -> None:
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.44))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 32)
    ax.axis("off")
    top, bottom, blue, grey, green = 25.0, 7.0, "#dbe9f6", "#eeeeee", "#d8f0d8"
    xs = [9, 27, 45, 63]
    for x, text, colour in zip(
        xs,
        [
            "context tokens",
            "context encoder $f_\\theta$\n(ViT, trained)",
            "predictor, shared by levels\n+ mask tokens at targets",
            "pred$_l$: mean of predicted\ntokens per cell + head$_l$",
        ],
        [green, blue, blue, blue],
    ):
        box(ax, x, top, text, colour)
    for x, text, colour in zip(
        xs,
        [
            "whole image",
            "target encoder $f_\\xi$\n(EMA of $f_\\theta$, no gradient)",
            "2D average pool by $2^l$\n(ceil cells), LayerNorm",
            "target$_l$: the cells that\nthe target blocks cover",
        ],
        [grey, grey, grey, grey],
    ):
        box(ax, x, bottom, text, colour)
    for a, b in zip(xs, xs[1:]):
        arrow(ax, (a + 8.3, top), (b - 8.3, top))
        arrow(ax, (a + 8.3, bottom), (b - 8.3, bottom))
    arrow(ax, (27, top - 3.9), (27, bottom + 3.9), dashed=True)
    ax.text(
        28,
        16,
        "$\\xi \\leftarrow m\\xi + (1-m)\\theta$\nafter each optimizer step",
        fontsize=7.5,
        va="center",
    )
    box(
        ax,
        88,
        16,
        "loss = $\\Sigma_l\\, w_l\\, D($pred$_l$, target$_l)$\n"
        "+ $\\lambda\\,$SIGReg(context tokens)",
        "#fbe3c8",
        width=20,
    )
    arrow(ax, (71.3, top), (80, 18.5))
    arrow(ax, (71.3, bottom), (80, 13.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--index", type=int, default=0, help="test image to draw")
    parser.add_argument("--seed", type=int, default=31, help="seed of the mask draw")
    parser.add_argument("--out", default=str(Path(__file__).with_name("method.png")))
    args = parser.parse_args()
    images = load_fashion_mnist(args.root, "test").images
    image = images[args.index, 0].numpy()
    fig = Figure(figsize=(12, 5.2), dpi=100)
    draw_masks(fig, image, sample_masks(args.seed))
    draw_step(fig)
    fig.text(
        0.5,
        0.485,
        "A real draw of the sampler: four target blocks (colours), a context square without them "
        "(green; dotted: the removed blocks), and per level the cells each block covers.",
        ha="center",
        fontsize=8,
    )
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
