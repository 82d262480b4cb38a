"""Scale-out pieces: presets, predictor modes, trimmed last blocks, image folders in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.config import ConfigError, load_config
from hjepa.models.predictor import Predictor
from hjepa.models.vit import Block, ContextBlocks, run_blocks
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import Trainer
from tests.benchmark_scripts import load_benchmark


def shared_attention_mask(num_context: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """``[L, L]`` bool (True: may attend), ``L = Nc + M Nt``, for the sequence ``[context,
    block 1, ..., block M]``: context rows see the context; block rows see the context and
    their own block. The pattern :class:`ContextBlocks` computes without the masked scores."""
    group = torch.arange(num_blocks).repeat_interleave(block_size)
    group = torch.cat([torch.full((num_context,), -1), group])
    return (group[None, :] == -1) | (group[:, None] == group[None, :])


# -- presets ------------------------------------------------------------------------------------


def test_imagenet_presets_follow_the_ijepa_recipe():
    for name, width, heads in (("imagenet100_vits16", 384, 6), ("imagenet1k_vitb16", 768, 12)):
        cfg = load_config(name, ["data.root=/data/imagenet"])
        m, t, o = cfg.model, cfg.train, cfg.optim
        assert (m.patch_size, m.embed_dim, m.depth, m.num_heads) == (16, width, 12, heads)
        assert (m.predictor_embed_dim, m.predictor_depth) == (384, 12)
        assert (t.batch_size, t.epochs, t.ema_start, t.ema_end) == (2048, 300, 0.996, 1.0)
        assert (o.lr, o.start_lr, o.final_lr) == (1e-3, 1e-4, 1e-6)
        assert o.warmup_fraction * t.epochs == pytest.approx(15)  # 15 warmup epochs
        assert (o.weight_decay, o.final_weight_decay) == (0.04, 0.4)
        assert (cfg.data.name, cfg.data.image_size, cfg.data.channels) == ("image_folder", 224, 3)
        assert t.num_workers > 0  # JPEG decoding in DataLoader workers
        assert cfg.masking.num_targets == 4 and cfg.masking.target_scale == [0.15, 0.2]
    assert load_config("imagenet100_vits16").data.class_subset == "imagenet100"
    assert load_config("imagenet1k_vitb16").data.class_subset == ""


def test_cifar10_preset_loads_with_a_three_level_8x8_grid():
    cfg = load_config("cifar10")
    assert cfg.data.name == "cifar10" and cfg.data.image_size // cfg.model.patch_size == 8
    assert cfg.model.levels == 3


def test_unknown_predictor_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="repeat, shared"):
        load_config(None, ["model.predictor_mode=blockwise"])


# -- trimmed last block -------------------------------------------------------------------------


def test_block_outputs_for_the_kept_rows_equal_the_full_block():
    torch.manual_seed(0)
    block = Block(16, 2).eval()
    x = torch.randn(3, 9, 16)
    mask = torch.rand(9, 9) > 0.3
    mask |= torch.eye(9, dtype=torch.bool)
    full = block(x, mask)
    torch.testing.assert_close(block(x, mask, first_query=4), full[:, 4:])
    blocks = torch.nn.ModuleList([Block(16, 2), Block(16, 2)]).eval()
    reference = blocks[1](blocks[0](x))[:, 5:]
    torch.testing.assert_close(run_blocks(blocks, x, keep_from=5), reference)


# -- predictor modes ----------------------------------------------------------------------------


def _inputs(b=2, nc=5, m=3, nt=4, grid=6, dim=32):
    g = torch.Generator().manual_seed(1)
    context = torch.randn(b, nc, dim, generator=g)
    order = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(b)])
    context_index = order[:, :nc]
    target_index = order[:, nc : nc + m * nt].reshape(b, m, nt)
    return context, context_index, target_index


def _predictor(mode: str) -> Predictor:
    torch.manual_seed(0)
    return Predictor(6, 32, 16, 2, 2, mode=mode).eval()


def test_shared_mode_is_per_block_prediction_with_a_context_that_sees_only_itself():
    """Reference: each block on its own, ``[context, block]``, context rows masked from the
    block's mask tokens. The shared pass must give the same predictions for every block."""
    context, context_index, target_index = _inputs()
    shared = _predictor("shared")
    out = shared(context, context_index, target_index)
    b, m, nt = target_index.shape
    nc = context_index.shape[1]
    ctx = shared.add_positions(shared.embed(context), context_index)
    for block_id in range(m):
        index = target_index[:, block_id]
        queries = shared.add_positions(shared.mask_token.expand(b, nt, -1), index)
        x = torch.cat([ctx, queries], dim=1)
        mask = torch.ones(nc + nt, nc + nt, dtype=torch.bool)
        mask[:nc, nc:] = False  # the context does not see the mask tokens
        for blk in shared.blocks:
            x = blk(x, mask)
        torch.testing.assert_close(out[:, block_id], shared.norm(x[:, nc:]))


def test_repeat_mode_is_ijepa_context_repeated_per_block_and_differs_from_shared():
    context, context_index, target_index = _inputs()
    repeat = _predictor("repeat")
    out = repeat(context, context_index, target_index)
    b, m, nt = target_index.shape
    ctx = repeat.add_positions(repeat.embed(context), context_index)
    for block_id in range(m):
        queries = repeat.add_positions(
            repeat.mask_token.expand(b, nt, -1), target_index[:, block_id]
        )
        x = torch.cat([ctx, queries], dim=1)  # no mask: the context sees the mask tokens
        for blk in repeat.blocks:
            x = blk(x)
        torch.testing.assert_close(out[:, block_id], repeat.norm(x[:, -nt:]))
    assert not torch.allclose(out, _predictor("shared")(context, context_index, target_index))


def test_shared_blocks_do_not_see_each_other():
    context, context_index, target_index = _inputs()
    shared = _predictor("shared")
    moved = target_index.clone()
    moved[:, 2] = moved[:, 2].flip(-1)  # block 2's positions change order (and so its rows)
    a, b = shared(context, context_index, target_index), shared(context, context_index, moved)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # blocks 0 and 1 are untouched
    torch.testing.assert_close(a[:, 2], b[:, 2].flip(1))


@pytest.mark.parametrize("first_query", [0, 3])
def test_context_blocks_attention_equals_the_masked_attention(first_query):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3 + 2 * 4, 8, generator=g).requires_grad_() for _ in range(3))
    mask = shared_attention_mask(3, 2, 4)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reference = reference[:, :, first_query:]
    out = ContextBlocks(3, 2, 4).attend(q, k, v, first_query)
    torch.testing.assert_close(out, reference)
    weights = torch.randn(out.shape, generator=g)  # gradients too, through the split pieces
    expected = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)), expected):
        torch.testing.assert_close(got, want)


def test_shared_attention_mask_by_hand():
    mask = shared_attention_mask(2, 2, 1)  # [c, c, block0, block1]
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("mode", ["repeat", "shared"])
def test_predictor_linear_flops_match_the_token_counts(tiny_config, mode):
    """Forward multiply-adds of the predictor's linear layers, by hand: the embedding on the
    ``Nc`` context rows, ``12 d^2`` per row and block (qkv ``3d^2``, projection ``d^2``, MLP
    ``8d^2``), except that the last block computes only the qkv (``3d^2``) of rows nobody
    reads. Rows per sample: ``M (Nc + Nt)`` in repeat mode, ``Nc + M Nt`` in shared mode.
    Backward doubles it (input and weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = Trainer(tiny_config(f"model.predictor_mode={mode}", "model.predictor_depth=3"))
    trainer.model.train()
    micro, images = next(trainer.batches())
    x, index, *_ = trainer.inputs(images, micro)  # the masks the step draws (same stream)
    with FlopCounterMode(display=False) as counter:
        loss = trainer.train_step([(micro, images)]).terms[0]
    assert torch.isfinite(loss)
    counted = counter.get_flop_counts()["HJEPA.predictor"]
    linear = sum(v for op, v in counted.items() if str(op) in ("aten.addmm", "aten.mm"))
    b, nc = index.context.shape
    _, m, nt = index.blocks[0].shape
    cfg = trainer.cfg.model
    d, depth = cfg.predictor_embed_dim, cfg.predictor_depth
    rows = m * (nc + nt) if mode == "repeat" else nc + m * nt
    macs = nc * cfg.embed_dim * d + (depth - 1) * rows * 12 * d * d
    macs += rows * 3 * d * d + m * nt * 9 * d * d  # the last block
    assert linear == 2 * 3 * b * macs


# -- image folders in training ------------------------------------------------------------------


def _folder(root, per_class: int, corrupt: str | None = None) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "a" / corrupt).write_bytes(b"not an image")


def test_image_folder_training_decodes_in_workers_and_logs_skipped_images(tiny_config, tmp_path):
    _folder(tmp_path / "data", per_class=7, corrupt="bad.png")  # 15 files, one unreadable
    cfg = tiny_config(
        "data.name=image_folder",
        f"data.root={tmp_path / 'data'}",
        "data.image_size=16",
        "data.channels=3",
        "train.batch_size=5",
        "train.max_steps=3",  # the whole epoch: 15 files in 3 batches
        "train.num_workers=1",
        "train.knn_bank_size=8",
        "train.knn_query_size=4",
        "eval.knn_k=3",
    )
    with pytest.warns(UserWarning, match="bad.png"):
        trainer = Trainer(cfg)
        trainer.fit()
    assert trainer.loader.in_memory is False
    logged = read_metrics(cfg.run.dir, "train")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[-1]["skipped_images"] == 1  # counted
    batches = trainer.batches()  # the next epoch meets the bad file again
    sizes = [next(batches)[1].shape[0] for _ in range(3)]
    assert sizes == [5, 5, 5] and trainer.loader.skipped == 2  # the short batch was refilled


def test_gpu_check_busy_time_counts_overlapping_kernels_once():
    script = load_benchmark("gpu_check")
    # [0, 15) from two overlapping kernels, [20, 25) holding a nested one, an empty interval.
    intervals = [(22.0, 23.0), (5.0, 15.0), (0.0, 10.0), (20.0, 25.0), (30.0, 30.0)]
    assert script.busy_time(intervals) == 20.0
    assert script.busy_time([]) == 0.0
    assert script.busy_time([(1.0, 2.0), (2.0, 4.0)]) == 3.0  # touching: no double count
