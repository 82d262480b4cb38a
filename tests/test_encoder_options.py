"""Encoder options: attention backends, 2D RoPE, LayerScale + drop path, gradient checkpointing,
nested config keys, and "off is bit-identical to the code before the options"."""

import math

import pytest
import torch
import torch.nn.functional as F

from hjepa.config import ConfigError, dump_yaml, from_dict, load_config, valid_keys
from hjepa.models import vit
from hjepa.models.hjepa import HJEPA
from hjepa.models.predictor import Predictor
from hjepa.models.rope import apply_rope, grid_positions, rope_tables
from hjepa.models.vit import (
    Attention,
    Block,
    LayerScale,
    VisionTransformer,
    attention_backend,
    gather_tokens,
    sincos_1d,
    sincos_2d,
)
from hjepa.train.trainer import Trainer

# -- attention backends ----------------------------------------------------------------------


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_attention_equals_softmax_reference(backend):
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(3, 7, 16)
    with attention_backend(backend):
        out = attn(x)
    torch.testing.assert_close(out, _reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_attention_backend_sets_and_restores_the_sdpa_flags():
    flags = (
        torch.backends.cuda.flash_sdp_enabled,
        torch.backends.cuda.math_sdp_enabled,
        torch.backends.cuda.cudnn_sdp_enabled,
    )
    before = [flag() for flag in flags]
    with attention_backend("math"):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    with attention_backend("flash"):
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
    with attention_backend("auto"):  # every kernel but cuDNN's (a graph per new shape)
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backend("cudnn"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
    assert [flag() for flag in flags] == before
    with pytest.raises(ValueError, match="not one of"), attention_backend("fast"):
        pass


def test_flash_and_efficient_are_refused_without_cuda(tiny_config):
    with pytest.raises(ConfigError, match="cudnn needs a CUDA GPU with bf16/fp16; use auto"):
        load_config(None, ["model.attention=cudnn", "train.device=cpu"])
    with pytest.raises(ConfigError, match="cudnn needs a CUDA GPU with bf16/fp16"):
        load_config(None, ["model.attention=cudnn", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="flash needs a CUDA GPU with bf16/fp16; use auto"):
        load_config(None, ["model.attention=flash", "train.device=cpu"])
    with pytest.raises(ConfigError, match="efficient needs a CUDA GPU; use auto"):
        load_config(None, ["model.attention=efficient", "train.device=mps"])
    with pytest.raises(ConfigError, match="flash needs a CUDA GPU with bf16/fp16"):
        load_config(None, ["model.attention=flash", "train.precision=fp32"])
    if not torch.cuda.is_available():  # device=auto resolves at Trainer time
        with pytest.raises(ConfigError, match="model.attention=flash needs a CUDA GPU"):
            Trainer(tiny_config("model.attention=flash"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_runs_attention_under_the_configured_backend(tiny_config, checkpointing):
    trainer = Trainer(
        tiny_config("model.attention=math", f"model.grad_checkpointing={checkpointing}")
    )
    seen: list[tuple[bool, bool]] = []

    def record(module, args):
        flags = torch.backends.cuda
        seen.append((flags.math_sdp_enabled(), flags.flash_sdp_enabled()))

    for encoder in (trainer.model.context_encoder, trainer.model.target_encoder):
        encoder.blocks[0].attn.register_forward_pre_hook(record)
    trainer.model.train()
    trainer.train_step(next(trainer.step_batches()))
    # Target pass + context pass (+ the recomputation inside backward with checkpointing).
    assert len(seen) == (3 if checkpointing else 2)
    assert all(s == (True, False) for s in seen)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step


# -- 2D RoPE -----------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """RoPE of ``x [N, d]`` at grid positions (rows[i], cols[i]) through the public functions."""
    pos = torch.tensor([rows, cols], dtype=torch.float32).T[None]
    cos, sin = rope_tables(pos, x.shape[-1])
    return apply_rope(x[None, None], cos, sin)[0, 0]


def test_rope_rotates_channel_pairs_by_hand():
    # head 8: rows rotate pairs (0, 2), (1, 3) with frequencies 1 and 100^-1/2; columns (4, 6),
    # (5, 7) likewise.
    x = torch.arange(1.0, 9.0)[None]
    r, c = 2, 3
    out = _rotate(x, [r], [c])[0]
    w = [1.0, 100.0**-0.5]
    expected = x[0].clone()
    for base, p in ((0, r), (4, c)):
        for i in range(2):
            a, b = x[0, base + i], x[0, base + i + 2]
            expected[base + i] = a * math.cos(p * w[i]) - b * math.sin(p * w[i])
            expected[base + i + 2] = a * math.sin(p * w[i]) + b * math.cos(p * w[i])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(), x.norm())  # a rotation keeps the length


def test_rope_scores_depend_only_on_the_2d_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)

    def score(pq, pk):
        return float(_rotate(q, [pq[0]], [pq[1]]) @ _rotate(k, [pk[0]], [pk[1]]).T)

    base = score((1, 2), (4, 0))
    for shift in ((1, 0), (0, 3), (5, 7), (-1, 2)):
        shifted = score((1 + shift[0], 2 + shift[1]), (4 + shift[0], 0 + shift[1]))
        assert shifted == pytest.approx(base, abs=1e-4)
    # A different offset (row or column) gives a different score.
    assert abs(score((1, 2), (5, 0)) - base) > 1e-3
    assert abs(score((1, 2), (4, 1)) - base) > 1e-3


def _two_patch_image(offset: int, grid: int = 4, patch: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    a, b = torch.randn(1, patch, patch), torch.randn(1, patch, patch)
    img = torch.zeros(1, 1, grid * patch, grid * patch)
    r, c = divmod(offset, grid)
    img[0, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = a
    img[0, :, r * patch : (r + 1) * patch, (c + 1) * patch : (c + 2) * patch] = b
    return img


def test_rope_encoder_positions_come_from_grid_indices():
    torch.manual_seed(0)
    enc = VisionTransformer(16, 4, 1, 32, 2, 2, pos_embed="rope").eval()
    assert enc.pos_embed is None
    x = torch.randn(2, 1, 16, 16)
    full = enc(x)
    perm = torch.randperm(16).expand(2, -1)
    torch.testing.assert_close(enc(x, keep=perm), gather_tokens(full, perm), atol=1e-5, rtol=1e-5)
    # The same two patches, shifted by (1, 1) on the grid, give the same tokens: attention sees
    # only offsets. Their list indices are the same (0, 1), their grid indices differ.
    at0 = enc(_two_patch_image(0), keep=torch.tensor([[0, 1]]))
    at5 = enc(_two_patch_image(5), keep=torch.tensor([[5, 6]]))
    torch.testing.assert_close(at0, at5, atol=1e-5, rtol=1e-5)
    # Same contents but the second token two columns away instead of one: different tokens.
    img = _two_patch_image(0)
    img2 = torch.zeros_like(img)
    img2[..., :, 0:4], img2[..., :, 8:12] = img[..., :, 0:4], img[..., :, 4:8]
    apart = enc(img2, keep=torch.tensor([[0, 2]]))
    assert not torch.allclose(at0, apart, atol=1e-4)
    # Sin-cos positions are absolute: the shifted pair differs there.
    sincos = VisionTransformer(16, 4, 1, 32, 2, 2).eval()
    s0 = sincos(_two_patch_image(0), keep=torch.tensor([[0, 1]]))
    s5 = sincos(_two_patch_image(5), keep=torch.tensor([[5, 6]]))
    assert not torch.allclose(s0, s5, atol=1e-4)


def test_rope_encoder_runs_at_another_resolution():
    torch.manual_seed(0)
    enc = VisionTransformer(16, 4, 1, 32, 2, 2, pos_embed="rope").eval()
    small = torch.randn(1, 1, 16, 16)
    big = torch.zeros(1, 1, 24, 24)
    big[..., 4:20, 4:20] = small  # the 4x4 patch grid sits at offset (1, 1) of a 6x6 grid
    assert enc(big).shape == (1, 36, 32)
    inner = torch.tensor([[r * 6 + c for r in range(1, 5) for c in range(1, 5)]])
    torch.testing.assert_close(enc(big, keep=inner), enc(small), atol=1e-5, rtol=1e-5)


def test_sincos_table_at_another_grid_spans_the_same_range():
    torch.testing.assert_close(sincos_2d(8, 4, extent=4), sincos_2d(8, 4), atol=0, rtol=0)
    table = sincos_2d(8, 2, extent=4)  # cells of a 2x2 view centred at 0.5 and 2.5
    coords = torch.tensor([0.5, 2.5])
    rows, cols = sincos_1d(4, coords), sincos_1d(4, coords)
    torch.testing.assert_close(table[1], torch.cat([rows[0], cols[1]]).float())
    torch.testing.assert_close(table[2], torch.cat([rows[1], cols[0]]).float())
    enc = VisionTransformer(16, 4, 1, 32, 1, 2).eval()
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 4, 32)


def test_rope_predictor_is_translation_invariant_and_position_aware():
    torch.manual_seed(0)
    pred = Predictor(6, 32, 16, 2, 2, pos_embed="rope").eval()
    assert pred.pos_embed is None
    ctx = torch.randn(1, 4, 32)
    ctx_idx = torch.tensor([[0, 1, 6, 7]])
    tgt = torch.tensor([[[2, 8], [13, 14]]])
    out = pred(ctx, ctx_idx, tgt)
    # Every grid index shifted by one row and one column: offsets unchanged, output unchanged.
    torch.testing.assert_close(pred(ctx, ctx_idx + 7, tgt + 7), out, atol=1e-5, rtol=1e-5)
    moved = pred(ctx, ctx_idx, torch.tensor([[[2, 8], [13, 20]]]))
    torch.testing.assert_close(moved[:, 0], out[:, 0], atol=1e-6, rtol=0)  # blocks independent
    assert not torch.allclose(moved[:, 1], out[:, 1], atol=1e-4)


def test_rope_needs_head_width_divisible_by_four():
    with pytest.raises(ConfigError, match="head widths divisible by 4"):
        load_config(None, ["model.pos_embed=rope", "model.embed_dim=24", "model.num_heads=4"])
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionTransformer(16, 4, 1, 24, 1, 4, pos_embed="rope")


def test_grid_positions_are_row_and_column():
    pos = grid_positions(torch.tensor([[0, 5, 11]]), 4)
    assert pos.tolist() == [[[0.0, 0.0], [1.0, 1.0], [2.0, 3.0]]]


# -- LayerScale with drop path ---------------------------------------------------------------


def test_layer_scale_and_drop_path_both_act():
    torch.manual_seed(0)
    block = Block(8, 2, drop_path=0.5, layer_scale=0.1).train()
    assert isinstance(block.ls1, LayerScale) and torch.all(block.ls1.gamma == 0.1)
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.05, 0.2)
        block.ls2.gamma.uniform_(0.05, 0.2)
    x = torch.randn(64, 3, 8)
    torch.manual_seed(123)
    out = block(x)
    torch.manual_seed(123)  # the same Bernoulli draws, in the block's order
    keep1 = torch.empty(64, 1, 1).bernoulli_(0.5)
    keep2 = torch.empty(64, 1, 1).bernoulli_(0.5)
    h = x + keep1 / 0.5 * (block.ls1.gamma * block.attn(block.norm1(x)))
    ref = h + keep2 / 0.5 * (block.ls2.gamma * block.mlp(block.norm2(h)))
    torch.testing.assert_close(out, ref)
    assert 0 < int(keep1.sum()) < 64  # some branches dropped, some kept: both mechanisms acted
    out.sum().backward()
    assert block.ls1.gamma.grad is not None and block.ls1.gamma.grad.abs().sum() > 0
    off = Block(8, 2, layer_scale=0.0)
    assert isinstance(off.ls1, torch.nn.Identity)
    assert not any("gamma" in name for name, _ in off.named_parameters())


def test_layer_scale_reaches_every_block_of_encoder_and_predictor():
    cfg = load_config(None, ["model.layer_scale=0.1", "model.drop_path=0.1"])
    model = HJEPA(cfg.model, 28, 1)
    blocks = [*model.context_encoder.blocks, *model.predictor.blocks]
    assert all(isinstance(b.ls2, LayerScale) for b in blocks)
    assert all(float(b.ls1.gamma.detach()[0]) == pytest.approx(0.1) for b in blocks)
    assert blocks[-1].drop_path.p == pytest.approx(0.1)


# -- gradient checkpointing ------------------------------------------------------------------


def _step_grads(trainer: Trainer, capture_grads) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    grads = capture_grads(trainer.model)
    loss = trainer.train_step(next(trainer.step_batches())).terms[0]
    return loss, grads


def test_grad_checkpointing_gives_identical_loss_and_gradients(
    tiny_config, tmp_path, capture_grads
):
    common = ["model.drop_path=0.2", "model.predictor_depth=2"]  # drop path: RNG is replayed
    plain = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'a'}"))
    ckpt = Trainer(
        tiny_config(*common, "model.grad_checkpointing=true", f"run.dir={tmp_path / 'b'}")
    )
    calls = []
    ckpt.model.predictor.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    loss_a, grads_a = _step_grads(plain, capture_grads)
    loss_b, grads_b = _step_grads(ckpt, capture_grads)
    assert len(calls) == 2  # one predictor pass (constant mode): forward + recomputation
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-6)


# -- nested config keys ----------------------------------------------------------------------


def test_nested_keys_set_validate_and_round_trip(tmp_path):
    cfg = load_config(None, ["data.augment.mixup=0.2", "data.multicrop.num_local=2"])
    assert cfg.data.augment.mixup == 0.2 and cfg.data.multicrop.num_local == 2
    assert {"data.augment.cutmix", "data.multicrop.local_scale", "model.fpn"} <= set(valid_keys())
    with pytest.raises(ConfigError, match="data.augment.mixup"):
        load_config(None, ["data.augment.mixpu=0.2"])
    with pytest.raises(ConfigError, match="group of settings"):
        load_config(None, ["data.augment=3"])
    as_dict = load_config(
        None, ["data.augment={cutmix: 1.0, three_augment: 0.5, blur_sigma: [0.2, 1.0]}"]
    )
    assert as_dict.data.augment.cutmix == 1.0 and as_dict.data.augment.blur_sigma == [0.2, 1.0]
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: defaults\ndata:\n  augment:\n    random_erasing: 0.25\n"
        "  multicrop:\n    num_local: 1\n    weight: 2\n"
    )
    from_yaml = load_config(str(path))
    assert from_yaml.data.augment.random_erasing == 0.25 and from_yaml.data.multicrop.weight == 2.0
    assert from_dict(from_yaml.to_dict()) == from_yaml
    assert "random_erasing: 0.25" in dump_yaml(from_yaml)
    with pytest.raises(ConfigError, match="probability"):
        load_config(None, ["data.augment.three_augment=1.5"])


# -- off is bit-identical ---------------------------------------------------------------------
# The forwards as they were before the options existed (sin-cos positions, no LayerScale, no
# checkpointing, no backend selection), patched in to get "a build without the options".


def _legacy_attention_forward(self, x, attn_mask=None):
    b, n, d = x.shape
    qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _legacy_block_forward(self, x, attn_mask=None):
    x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _legacy_encoder_forward(self, images, keep=None, keep_valid=None):
    assert keep_valid is None  # no padding on the CPU without train.compile
    x = self.patch_embed(images).flatten(2).transpose(1, 2)
    x = x + self.pos_embed.to(x.dtype)
    if keep is not None:
        x = gather_tokens(x, keep)
    for block in self.blocks:
        x = block(x)
    return self.norm(x)


def _legacy_predictor_forward(
    self, context, context_index, target_index, context_valid=None, target_valid=None
):
    assert context_valid is None and target_valid is None  # unpadded, as before buckets
    b, m, nt = target_index.shape
    pos = self.pos_embed.to(context.dtype).expand(b, -1, -1)
    ctx = self.embed(context) + gather_tokens(pos, context_index)
    queries = self.mask_token + gather_tokens(pos, target_index.reshape(b, m * nt))
    x = torch.cat([ctx.repeat_interleave(m, dim=0), queries.reshape(b * m, nt, -1)], dim=1)
    for block in self.blocks:
        x = block(x)
    x = self.norm(x[:, -nt:])
    return x.reshape(b, m, nt, -1)


def _two_steps(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.model.train()
    batches = trainer.step_batches()
    out = {}
    for i in range(2):
        out[f"loss{i}"] = trainer.train_step(next(batches)).terms[0]
    out.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
    return out


def test_options_off_are_bit_identical_to_the_code_before_them(tiny_config, tmp_path, monkeypatch):
    common = ["model.drop_path=0.1", "masking.scale_mode=gentle"]
    new = _two_steps(Trainer(tiny_config(*common, f"run.dir={tmp_path / 'new'}")))
    monkeypatch.setattr(vit.Attention, "forward", _legacy_attention_forward)
    monkeypatch.setattr(vit.Block, "forward", _legacy_block_forward)
    monkeypatch.setattr(vit.VisionTransformer, "forward", _legacy_encoder_forward)
    monkeypatch.setattr(Predictor, "forward", _legacy_predictor_forward)
    old = _two_steps(Trainer(tiny_config(*common, f"run.dir={tmp_path / 'old'}")))
    assert new.keys() == old.keys()
    assert torch.equal(new["loss0"], old["loss0"])  # the forward pass: bit for bit
    for key in new:
        # The predictor's last block now skips the context rows nobody reads (run_blocks'
        # keep_from): the same numbers, but weight gradients sum over fewer (zero) rows, which
        # moves the last bits (measured: <= 5e-9 after two steps).
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=1e-7, msg=key)
