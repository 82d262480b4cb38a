"""hjepa viz: attention weights, PCA colours, mask cells, and the PNGs a run gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.cli import main
from hjepa.config import load_config
from hjepa.data.masks import footprint_to_level
from hjepa.models.vit import VisionTransformer
from hjepa.train.trainer import train
from hjepa.viz.attention import attention_summaries, last_block_attention
from hjepa.viz.curves import plot_curves
from hjepa.viz.mask_plots import cells_to_tokens
from hjepa.viz.pca import pca_rgb
from hjepa.viz.runner import visualize_run
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("viz") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=3", "train.knn_every=1"]))
    return run


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_attention_weights_reproduce_the_block_output(pos_embed):
    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 32, 2, 4, pos_embed=pos_embed).eval()
    images = torch.randn(2, 1, 16, 16)
    seen = {}
    attn = vit.blocks[-1].attn
    handle = attn.register_forward_hook(lambda m, a, out: seen.update(args=a, out=out))
    weights = last_block_attention(vit, images)
    vit(images)
    handle.remove()
    assert weights.shape == (2, 4, 16, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 16))
    # softmax(qk/sqrt d) @ v, merged and projected, must be exactly what the block computed.
    x = seen["args"][0]
    b, n, d = x.shape
    v = attn.qkv(x).view(b, n, 3, 4, d // 4)[:, :, 2].transpose(1, 2)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)


def test_attention_summaries_hand_example():
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]  # [1, 2, 2, 2]
    from_q, received = attention_summaries(a, query=1)
    torch.testing.assert_close(from_q, torch.tensor([[0.5, 0.5]]))  # head mean of row 1
    torch.testing.assert_close(received, torch.tensor([[0.375, 0.625]]))  # column means


def test_pca_rgb_follows_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.tensor([0.1, 0.9, -0.3, 0.2])
    strength = torch.linspace(-3, 3, 2 * 9)
    tokens = strength[:, None] * direction + 0.01 * torch.randn(18, 4, generator=g)
    rgb = pca_rgb(tokens.view(2, 9, 4), 3)
    assert rgb.shape == (2, 3, 3, 3)
    red = rgb[..., 0].reshape(-1)
    assert np.all(np.diff(red) > 0)  # sign-fixed: largest loading (0.9) positive -> increasing
    assert red.min() == pytest.approx(0.0) and red.max() == pytest.approx(1.0)
    assert np.all((rgb >= 0) & (rgb <= 1))
    # Negated tokens: same canonical direction, projections negated -> colours flipped.
    np.testing.assert_allclose(pca_rgb(-tokens.view(2, 9, 4), 3)[..., 0], 1 - rgb[..., 0])


def test_cells_to_tokens_inverts_the_level_rule():
    cells = torch.zeros(16, dtype=torch.bool)
    cells[5] = True  # level-1 cell (1, 1) of an 8x8 grid covers tokens rows 2-3, cols 2-3
    tokens = cells_to_tokens(cells, 8, 1)
    assert tokens.view(8, 8).nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert torch.equal(footprint_to_level(tokens, 8, 1), cells)


def png(path):
    with Image.open(path) as image:
        return image.size, np.asarray(image.convert("L"), dtype=float)


def test_visualize_run_writes_non_empty_pngs_of_the_expected_size(tiny_run):
    paths = visualize_run(tiny_run, num_images=3)
    assert set(paths) == {"masks", "attention", "pca", "curves"}
    levels = 3
    expected = {  # figsize (inches) x 100 dpi
        "masks": (200 * (2 + levels), 200 * 3),
        "attention": (600, 200 * 3),
        "pca": (200 * 3, 400),
        "curves": (1200, 700),
    }
    for name, path in paths.items():
        assert path == tiny_run / "viz" / f"{name}.png"
        size, grey = png(path)
        assert size == expected[name], name
        assert grey.std() > 10, name  # a drawing, not a blank canvas


def test_viz_cli_and_curves_without_probes(tiny_run, tmp_path):
    assert main(["viz", str(tiny_run), "--only", "masks", "--images", "2", "--seed", "3"]) == 0
    assert png(tiny_run / "viz" / "masks.png")[0] == (1000, 400)
    assert main(["viz", str(tiny_run), "--query", "999"]) == 2  # outside the 8x8 grid
    records = [{"step": s, "kind": "train", "loss": 1.0 / s, "lr": 0.1} for s in (1, 2)]
    size, grey = png(plot_curves(records, tmp_path / "c.png"))
    assert size == (1200, 700) and grey.std() > 10
