"""A small, plain Vision Transformer: patch embedding, 2D positions, pre-norm blocks.

Attention goes through ``F.scaled_dot_product_attention``; :func:`attention_backend` picks the
kernels it may use (``torch.nn.attention.sdpa_kernel``, ``model.attention``). Positions
are fixed 2D sin-cos codes added to the patch embeddings (``pos_embed="sincos"``) or axial 2D
RoPE applied to queries and keys in every block (``pos_embed="rope"``, see ``models/rope.py``).
Tokens can be a subset of the grid (the context), selected by index, and a token's position
always comes from its grid index. Options: LayerScale (``layer_scale`` > 0), stochastic depth
(``drop_path``), per-block gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hjepa.config import CHOICES
from hjepa.grid import grid_side
from hjepa.models.rope import apply_rope, grid_positions, rope_tables

ATTENTION_BACKENDS = CHOICES["model.attention"]
POS_EMBEDS = CHOICES["model.pos_embed"]
STEMS = CHOICES["model.stem"]
CONV_STEMS = tuple(s for s in STEMS if s != "patch")  # the ConvStem kinds

Rope = tuple[Tensor, Tensor] | None  # (cos, sin) tables [B, 1, N, head_dim/2]


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run SDPA with the kernels ``name`` allows.

    ``math``, ``efficient`` (memory-efficient), ``flash`` and ``cudnn`` pin one kernel. ``auto``
    lets PyTorch choose among all of them *but* cuDNN attention: cuDNN builds an execution graph
    for every new sequence length, and ours change every step (the context and target token
    counts are batch minima of random masks: 37 different pairs in 45 steps of the ViT-S/16
    preset), so each step would pay for new graphs. The flags are process-wide, so a backward
    pass (and the recomputation of checkpointed blocks) inside the same context uses them too.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = {
        "auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
    }[name]
    with sdpa_kernel(allowed):
        yield


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[len(positions), dim]``: sin on the first half of the channels, cos on the second."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, extent: int | None = None) -> Tensor:
    """Fixed 2D position table ``[grid_size**2, dim]`` in row-major token order.

    Half of the channels encode the row, half the column (each a 1D sin-cos code). With
    ``extent`` (the grid the model was built for) a ``grid_size`` grid is spread over the same
    coordinate range, cell centres at ``(i + 1/2) * extent / grid_size - 1/2``: a smaller view
    (a multi-crop local crop) covers the same span of positions, as interpolated position
    tables do in DINO.
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be a multiple of 4 for 2D sin-cos positions")
    coords = torch.arange(grid_size)
    if extent is not None and extent != grid_size:
        coords = (coords.to(torch.float64) + 0.5) * (extent / grid_size) - 0.5
    rows = sincos_1d(dim // 2, coords).repeat_interleave(grid_size, dim=0)
    cols = sincos_1d(dim // 2, coords).repeat(grid_size, 1)
    return torch.cat([rows, cols], dim=1).float()


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, D]``, ``index [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    """Learnable per-channel gain ``gamma ⊙ x`` on a residual branch (CaiT), ``gamma = init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


@dataclass(frozen=True)
class ContextBlocks:
    """The attention pattern of a sequence ``[context (Nc), block 1 (Nt), ..., block M (Nt)]``
    in which context rows attend to the context only and each block's rows to the context and
    their own block (the predictor's ``shared`` mode). Pass it as ``attn_mask``: attention is
    then computed as two unmasked products (context on context; each block on context + itself)
    instead of a masked ``L x L`` one, so no score is computed only to be masked away and
    the fused (flash) kernels stay usable.
    """

    num_context: int
    num_blocks: int
    block_size: int
    # Padded token counts (hjepa.data.buckets): False at padding, left out of every key.
    context_valid: Tensor | None = field(default=None, compare=False)  # [B, Nc]
    block_valid: Tensor | None = field(default=None, compare=False)  # [B, M, Nt]

    def _masks(self, b: int) -> tuple[Tensor | None, Tensor | None]:
        """Key masks of the context rows ``[B, 1, 1, Nc]`` and of the block rows
        ``[B M, 1, 1, Nc + Nt]`` (None without padding)."""
        if self.context_valid is None and self.block_valid is None:
            return None, None
        nc, m, nt = self.num_context, self.num_blocks, self.block_size
        ctx = self.context_valid
        if ctx is None:
            ctx = torch.ones(b, nc, dtype=torch.bool, device=self.block_valid.device)
        blocks = self.block_valid
        if blocks is None:
            blocks = torch.ones(b, m, nt, dtype=torch.bool, device=ctx.device)
        keys = torch.cat([ctx[:, None].expand(b, m, nc), blocks], dim=2)
        return ctx[:, None, None], keys.reshape(b * m, 1, 1, nc + nt)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, first_query: int = 0) -> Tensor:
        """``q, k, v [B, H, Nc + M Nt, dh]`` -> outputs of rows ``first_query`` on
        (``first_query`` is 0 or ``Nc``)."""
        nc, m, nt = self.num_context, self.num_blocks, self.block_size
        if first_query not in (0, nc):
            raise ValueError(f"first_query must be 0 or the context length {nc}, got {first_query}")
        b, h, _, dh = k.shape
        # split, not slicing: its backward concatenates the two gradients in one pass, where
        # each slice's backward would fill a zero tensor of the full size first.
        (q_ctx, q_blocks), (k_ctx, k_blocks), (v_ctx, v_blocks) = (
            t.split([nc, m * nt], dim=2) for t in (q, k, v)
        )

        def per_block(t: Tensor) -> Tensor:  # [B, H, M Nt, dh] -> [B M, H, Nt, dh]
            return t.reshape(b, h, m, nt, dh).transpose(1, 2).reshape(b * m, h, nt, dh)

        def with_context(ctx: Tensor, blocks: Tensor) -> Tensor:  # the context, then the block
            ctx = ctx[:, None].expand(b, m, h, nc, dh).reshape(b * m, h, nc, dh)
            return torch.cat([ctx, per_block(blocks)], dim=2)

        ctx_mask, block_mask = self._masks(b)
        out = F.scaled_dot_product_attention(
            per_block(q_blocks),
            with_context(k_ctx, k_blocks),
            with_context(v_ctx, v_blocks),
            attn_mask=block_mask,
        )
        out = out.reshape(b, m, h, nt, dh).transpose(1, 2).reshape(b, h, m * nt, dh)
        if first_query:
            return out
        ctx_out = F.scaled_dot_product_attention(q_ctx, k_ctx, v_ctx, attn_mask=ctx_mask)
        return torch.cat([ctx_out, out], dim=2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | ContextBlocks | None = None,
        rope: Rope = None,
        first_query: int = 0,
    ) -> Tensor:
        """Attention over all tokens of ``x``; outputs only for rows ``first_query`` on (every
        row still serves as a key and value). ``attn_mask``: bool (True = may attend), or a
        :class:`ContextBlocks` pattern."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(attn_mask, ContextBlocks):
            out = attn_mask.attend(q, k, v, first_query)
            return self.proj(out.transpose(1, 2).reshape(b, n - first_query, d))
        if first_query:
            q = q[:, :, first_query:]
            if attn_mask is not None and attn_mask.shape[-2] > 1:  # not a key-only mask
                attn_mask = attn_mask[..., first_query:, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n - first_query, d))


class Block(nn.Module):
    """Pre-norm block: ``x + dp(ls1 · attn(norm(x)))`` then ``x + dp(ls2 · mlp(norm(x)))``.

    ``dp`` is drop path, ``ls`` LayerScale (the identity when ``layer_scale`` is 0): both act on
    every residual branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale: float = 0.0,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)
        scale = (lambda: LayerScale(dim, layer_scale)) if layer_scale > 0 else nn.Identity
        self.ls1, self.ls2 = scale(), scale()

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, rope: Rope = None, first_query: int = 0
    ) -> Tensor:
        """``x [B, N, D]`` -> ``[B, N - first_query, D]``: the block's output for rows
        ``first_query`` on only (a last block whose other rows nobody reads skips them)."""
        h = self.attn(self.norm1(x), attn_mask, rope, first_query)
        x = x[:, first_query:] + self.drop_path(self.ls1(h))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    rope: Rope = None,
    checkpointing: bool = False,
    *,
    attn_mask: Tensor | None = None,
    keep_from: int = 0,
) -> Tensor:
    """Apply ``blocks`` in order; with ``checkpointing`` (and autograd on) each block's
    activations are recomputed in the backward pass instead of stored. The RNG state is
    replayed, so drop path draws the same masks twice and results are unchanged.

    ``attn_mask`` (bool, True = may attend) goes to every block. Only rows ``keep_from`` on
    are returned, and the last block computes only those (the same numbers, less work)."""
    recompute = checkpointing and torch.is_grad_enabled()
    if not len(blocks):
        return x[:, keep_from:]
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        first = keep_from if i == last else 0
        if recompute:
            x = checkpoint(block, x, attn_mask, rope, first, use_reentrant=False)
        else:
            x = block(x, attn_mask, rope, first)
    return x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit norms (as in ViT/I-JEPA)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Shrink each block's output projections by sqrt(2 * depth index) (I-JEPA's init)."""
    for i, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        block.mlp[2].weight.data.div_(math.sqrt(2.0 * i))


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al., 2021) in place of the one-shot patch projection:
    ``log2(patch_size)`` stages that each halve the image, widths doubling up to ``embed_dim``,
    then a 1x1 projection to ``embed_dim``. Same token grid as a patch embedding of
    ``patch_size``, but the pixels-to-token map is non-linear and each token's receptive field
    overlaps its neighbours' (:meth:`receptive_field`). A stage (``kind``):

    - ``conv``: one 3x3 convolution of stride 2 + GELU;
    - ``deepconv``: a 3x3 convolution of stride 1 + GELU at the stage's input resolution, then
      the stride-2 one + GELU (twice the depth, most of it at the finer resolution);
    - ``convpool``: a 3x3 convolution of stride 1 + GELU, then 2x2 max pooling (the layout of the
      textbook two-convolution CNN).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, kind: str = "conv"):
        super().__init__()
        if kind not in CONV_STEMS:
            raise ValueError(f"conv stem kind {kind!r} is not one of {CONV_STEMS}")
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"a conv stem needs a power-of-2 patch size >= 2, got {patch_size}")
        n = patch_size.bit_length() - 1  # halvings
        widths = [max(embed_dim >> (n - 1 - i), 8) for i in range(n)]
        layers: list[nn.Module] = []
        for width in widths:
            layers += _stem_stage(kind, in_channels, width)
            in_channels = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_channels, embed_dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.convs(images))

    def receptive_field(self) -> tuple[int, int]:
        """``(first, size)`` on each axis: token ``b`` of the grid sees input pixels
        ``first + b * patch_size`` to ``first + b * patch_size + size - 1`` (its own patch is
        ``b * patch_size`` to ``(b + 1) * patch_size - 1``), zero padding included."""
        first, size, jump = 0, 1, 1
        for layer in self.convs:
            if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
                k, s, p = (_pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
                first -= p * jump
                size += (k - 1) * jump
                jump *= s
        return first, size


def _pair(value: int | tuple[int, ...]) -> int:
    """One side of a square kernel/stride/padding setting."""
    return value if isinstance(value, int) else value[0]


def _stem_stage(kind: str, in_channels: int, width: int) -> list[nn.Module]:
    """The layers of one halving stage of a :class:`ConvStem` of ``kind``."""
    if kind == "conv":
        return [nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.GELU()]
    first = [nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU()]
    if kind == "deepconv":
        return first + [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU()]
    return first + [nn.MaxPool2d(2)]  # convpool


def input_channels(encoder_state: dict[str, Tensor]) -> int:
    """Image channels an encoder state dict was built for (patch or conv stem)."""
    key = "patch_embed.weight" if "patch_embed.weight" in encoder_state else "stem.convs.0.weight"
    return int(encoder_state[key].shape[1])


def check_pos_embed(pos_embed: str, dim: int, num_heads: int) -> None:
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed {pos_embed!r} is not one of {POS_EMBEDS}")
    if pos_embed == "rope" and (dim // num_heads) % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {dim}/{num_heads}")


class VisionTransformer(nn.Module):
    """ViT encoder over a ``grid_size x grid_size`` patch grid; returns normalised tokens."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        *,
        pos_embed: str = "sincos",
        layer_scale: float = 0.0,
        grad_checkpointing: bool = False,
        stem: str = "patch",
    ):
        super().__init__()
        check_pos_embed(pos_embed, embed_dim, num_heads)
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r} is not one of {STEMS}")
        self.patch_size = patch_size
        self.grid_size = grid_side(image_size, patch_size)
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.rope = pos_embed == "rope"
        self.grad_checkpointing = grad_checkpointing
        if stem != "patch":
            self.stem = ConvStem(in_channels, embed_dim, patch_size, stem)
        else:
            self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        table = None if self.rope else sincos_2d(embed_dim, self.grid_size)
        self.register_buffer("pos_embed", table, persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, r, layer_scale) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        rescale_residual_branches(self.blocks)
        if stem == "patch":
            w = self.patch_embed.weight
            nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02, a=-0.04, b=0.04)
        else:  # He init: the GELU stack keeps its activation scale from layer to layer
            for conv in self.stem.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    nn.init.zeros_(conv.bias)

    def forward(
        self, images: Tensor, keep: Tensor | None = None, keep_valid: Tensor | None = None
    ) -> Tensor:
        """``images [B, C, H, W]`` -> tokens ``[B, N, D]``, or ``[B, K, D]`` for ``keep [B, K]``.
        ``keep_valid [B, K]`` (bool): False at padded positions, which no token attends to
        (their own outputs are computed and meaningless).

        ``H = W`` may differ from the built image size (a multi-crop local view, another
        resolution): RoPE positions are the grid indices of that image's own grid; sin-cos
        positions are spread over the built grid's range (see :func:`sincos_2d`).
        """
        x = self.stem(images) if hasattr(self, "stem") else self.patch_embed(images)
        grid = x.shape[-1]
        if x.shape[-2] != grid:
            raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
        # Token-major memory: a transposed view would make every later LayerNorm copy it.
        x = x.flatten(2).transpose(1, 2).contiguous()
        if not self.rope:
            table = self.pos_embed
            if grid != self.grid_size:
                table = sincos_2d(self.embed_dim, grid, self.grid_size).to(x.device)
            x = x + table.to(x.dtype)
        if keep is not None:
            x = gather_tokens(x, keep)
        rope = None
        if self.rope:
            index = keep if keep is not None else torch.arange(grid * grid, device=x.device)
            positions = grid_positions(index, grid).expand(x.shape[0], -1, -1)
            rope = rope_tables(positions, self.head_dim)
        attn_mask = None if keep_valid is None else keep_valid[:, None, None, :]
        x = run_blocks(self.blocks, x, rope, self.grad_checkpointing, attn_mask=attn_mask)
        return self.norm(x)
