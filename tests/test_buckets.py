"""Token buckets: a handful of shapes, and the padded step computes what the unpadded one does.

The mask indices are padded up to a few fixed sizes (:mod:`hjepa.data.buckets`); the model
leaves the padding out of every attention key, cell mean, loss and SIGReg statistic, so in
float64 the loss and every gradient of a padded step equal those of the unpadded step.
"""

import pytest
import torch

from hjepa.config import load_config
from hjepa.data.buckets import TokenBuckets, pad_to
from hjepa.data.masks import sampler_from_config
from hjepa.grid import grid_side
from hjepa.models.hjepa import MaskIndices
from hjepa.train.parts import build_parts, mask_preparer
from hjepa.train.sync_audit import attention_key_lengths

DRAWS = 50


def test_pad_to_repeats_a_real_index_and_marks_the_padding():
    index = torch.tensor([[3, 5, 9], [1, 2, 4]])
    padded, valid = pad_to(index, 5)
    assert padded.tolist() == [[3, 5, 9, 3, 3], [1, 2, 4, 1, 1]]
    assert valid.tolist() == [[True, True, True, False, False]] * 2
    with pytest.raises(ValueError, match="cannot pad 3 indices down to 2"):
        pad_to(index, 2)


def _loss_and_grads(parts, images, index, step):
    model, objective = parts.model, parts.objective
    model.zero_grad(set_to_none=True)
    loss, terms = objective(model(images, index), step=step)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), torch.stack([t.detach() for t in terms.values()]), grads


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.predictor_mode=shared", "loss.regularize_on=context"),
        ("model.predictor_mode=repeat", "loss.regularize_on=predictor"),
        ("model.predictor_mode=shared", "loss.regularize_on=pooled"),
        ("model.predictor_mode=repeat", "model.fpn=add", "loss.regularize_on=context"),
    ],
    ids=["shared-context", "repeat-predictor", "shared-pooled", "repeat-fpn"],
)
def test_the_padded_step_equals_the_unpadded_one_in_float64(tiny_config, overrides):
    sigreg = ("loss.regularizer=sigreg", "loss.sigreg_slices=32")
    cfg = tiny_config("model.levels=3", *sigreg, *overrides)
    parts = build_parts(cfg)
    parts.model.double().train()
    sampler = sampler_from_config(cfg)
    batch = cfg.train.batch_size
    buckets = TokenBuckets.for_sampler(sampler, batch)
    gen = torch.Generator().manual_seed(0)
    padded_any = 0
    for draw in range(DRAWS):
        index = MaskIndices.from_masks(sampler.sample(batch, gen))
        padded = index.padded(buckets)
        padded_any += padded.context.shape[1] > index.context.shape[1]
        padded_any += padded.blocks[0].shape[2] > index.blocks[0].shape[2]
        images = torch.randn(batch, 1, 32, 32, generator=gen, dtype=torch.float64)
        loss, terms, grads = _loss_and_grads(parts, images, index, draw)
        loss_p, terms_p, grads_p = _loss_and_grads(parts, images, padded, draw)
        torch.testing.assert_close(terms_p, terms, rtol=0, atol=1e-10)
        torch.testing.assert_close(loss_p, loss, rtol=0, atol=1e-10)
        assert grads_p.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grads_p[name], grad, rtol=0, atol=1e-10, msg=name)
    assert padded_any >= DRAWS  # the padding was there to leave out, most draws twice


def test_unpadded_indices_keep_the_shapes_of_the_masks(tiny_config):
    cfg = tiny_config("model.levels=3")
    sampler = sampler_from_config(cfg)
    masks = sampler.sample(16, torch.Generator().manual_seed(1))
    index = MaskIndices.from_masks(masks)
    assert index.context_valid is None and index.block_valid is None and index.cell_valid is None
    assert index.context.shape[1] == int(masks.context[0].sum())


@pytest.mark.parametrize("preset", ["quickstart"])
def test_a_preset_meets_at_most_8_attention_lengths_in_1000_steps(preset):
    cfg = load_config(preset, ["data.name=synthetic", "data.channels=1"])
    grid = grid_side(cfg.data.image_size, cfg.model.patch_size) ** 2
    lengths = {False: set(), True: set()}
    for pad_tokens in lengths:
        prepare = mask_preparer(cfg, cfg.train.batch_size, pad_tokens)
        for micro in range(1000):
            index = prepare(micro)
            lengths[pad_tokens] |= attention_key_lengths(index, cfg.model.predictor_mode, grid)
    assert len(lengths[True]) <= 8, sorted(lengths[True])
    assert len(lengths[False]) > 8  # what padding removes: the unpadded masks' many lengths
