"""``hjepa export RUN_DIR --format timm``: the target encoder as weights that timm loads.

Our ViT is, operation for operation, one of timm's (``timm==1.0.31`` checked in
``tests/test_export_timm.py``): pre-norm blocks with LayerNorm (eps 1e-6), fused qkv with bias,
exact GELU, optional LayerScale, a final LayerNorm, and no class token. So the export is a
renaming, plus:

- ``model.pos_embed=sincos``: timm's ``VisionTransformer`` (``class_token=False``), our fixed
  sin-cos table written into its (learned) ``pos_embed``;
- ``model.pos_embed=rope``: timm's ``Eva`` with ``attn_type='rope'`` (axial 2D RoPE, rows
  then columns, temperature = our base, full qkv bias). It pairs channel ``i`` with
  ``i + d/2`` of a head where we pair ``i`` with ``i + d/4`` inside each half: the query and key
  rows of ``qkv`` are reordered to its layout, which leaves every attention score unchanged.

Then timm's ``forward_features`` returns our tokens (``Encoder.tokens`` before pooling). A model
whose math timm cannot reproduce is refused with one line naming the option; a model option
this file does not know is refused too, so a new option can never export silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from hjepa import checkpoint as ckpt
from hjepa.config import Config, ModelConfig, from_dict
from hjepa.encoder import Encoder, encoder_from_state
from hjepa.models.rope import ROPE_BASE
from hjepa.models.vit import VisionTransformer
from hjepa.rundir import checkpoint_path

FORMAT = "hjepa.timm"
FORMAT_VERSION = 1
TIMM_VERSION = "1.0.31"  # the version the feature-equality test runs against

# Model options that shape the target encoder's forward pass: each is mapped below.
MAPPED_OPTIONS = (
    "patch_size",
    "stem",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "pos_embed",
    "layer_scale",
)
# Options that never touch the eval-mode target encoder (the predictor, training-only settings,
# the attention kernel choice, which computes the same function).
UNUSED_OPTIONS = (
    "predictor_embed_dim",
    "predictor_depth",
    "predictor_num_heads",
    "levels",
    "drop_path",
    "normalize_targets",
    "predictor_mode",
    "attention",
    "grad_checkpointing",
    "fpn",
    "target",
    "target_stop_grad",
)

# timm's own names for our architectures, by (patch, width, depth, heads, mlp ratio).
VIT_NAMES = {
    (16, 192, 12, 3, 4.0): "vit_tiny_patch16_224",
    (16, 384, 12, 6, 4.0): "vit_small_patch16_224",
    (16, 768, 12, 12, 4.0): "vit_base_patch16_224",
    (16, 1024, 24, 16, 4.0): "vit_large_patch16_224",
}
ROPE_NAMES = {
    (16, 384, 12, 6, 4.0): "vit_small_patch16_rope_224",
    (16, 768, 12, 12, 4.0): "vit_base_patch16_rope_224",
    (16, 1024, 24, 16, 4.0): "vit_large_patch16_rope_224",
}
# Any other size: the family's base model, every architecture argument overridden by kwargs.
FALLBACK = {"sincos": "vit_base_patch16_224", "rope": "vit_base_patch16_rope_224"}

# Every key of our ViT's state dict, and timm's name for it (regex, replacement).
_OUR_KEYS = re.compile(
    r"(patch_embed|norm)\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma"
)
_RENAMES = [
    (r"^patch_embed\.", "patch_embed.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.2\.", ".mlp.fc2."),
]
_EVA_RENAMES = [(r"\.ls1\.gamma$", ".gamma_1"), (r"\.ls2\.gamma$", ".gamma_2")]


class NotExportable(ValueError):
    """The encoder computes something timm cannot; the message names the option."""


def _refuse(option: str, why: str) -> NotExportable:
    return NotExportable(
        f"cannot export to timm: {option} ({why}); `hjepa export RUN_DIR` without --format "
        "shares it for hjepa.load_encoder"
    )


def check_exportable(model: ModelConfig) -> None:
    """Raise :class:`NotExportable` for the first model option timm cannot compute."""
    if model.stem != "patch":
        raise _refuse(f"model.stem={model.stem}", "timm's ViT has no convolutional stem")
    defaults = ModelConfig()
    for name in vars(defaults):
        known = name in MAPPED_OPTIONS or name in UNUSED_OPTIONS
        if not known and getattr(model, name) != getattr(defaults, name):
            value = getattr(model, name)
            raise _refuse(f"model.{name}={value}", "an option this exporter does not map")


def timm_arguments(cfg: Config, in_channels: int) -> tuple[str, dict[str, Any]]:
    """``(model_name, kwargs)`` for ``timm.create_model``: the kwargs fix every argument
    that shapes the math, so the name only picks timm's class and its pretrained_cfg."""
    check_exportable(cfg.model)
    m = cfg.model
    key = (m.patch_size, m.embed_dim, m.depth, m.num_heads, float(m.mlp_ratio))
    names = ROPE_NAMES if m.pos_embed == "rope" else VIT_NAMES
    kwargs: dict[str, Any] = {
        "img_size": cfg.data.image_size,
        "patch_size": m.patch_size,
        "in_chans": in_channels,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": float(m.mlp_ratio),
        "qkv_bias": True,
        "class_token": False,
        "global_pool": "avg",
        "num_classes": 0,
    }
    # timm.create_model drops None arguments, so "no LayerScale" cannot override the RoPE
    # models' 1e-5: those get LayerScale with gains of exactly 1 (x * 1 == x).
    if m.layer_scale > 0 or m.pos_embed == "rope":
        kwargs["init_values"] = m.layer_scale if m.layer_scale > 0 else 1.0
    if m.pos_embed == "rope":
        kwargs |= {
            "attn_type": "rope",
            "use_abs_pos_emb": False,
            "use_rot_pos_emb": True,
            "rope_type": "cat",
            "rope_temperature": ROPE_BASE,
            "rope_grid_indexing": "ij",  # rows first, as rope_tables
            "rope_grid_offset": 0.0,
            "rope_rotate_half": True,
            "use_fc_norm": False,  # the final norm on every token, before pooling
        }
    else:
        kwargs |= {"pos_embed": "learn", "no_embed_class": False, "reg_tokens": 0, "fc_norm": False}
    return names.get(key, FALLBACK[m.pos_embed]), kwargs


def _rope_head_order(head_dim: int) -> Tensor:
    """Our channel for each of timm's, inside one head: pairs ``(i, i + d/4)`` per half
    become pairs ``(j, j + d/2)``, i.e. the second and third quarters swap."""
    return torch.arange(head_dim).view(4, head_dim // 4)[[0, 2, 1, 3]].flatten()


def _reorder_query_key(qkv: Tensor, num_heads: int) -> Tensor:
    """``qkv`` weight ``[3D, D]`` or bias ``[3D]`` with the q and k rows in timm's order."""
    dim = qkv.shape[0] // 3
    head_dim = dim // num_heads
    per_head = _rope_head_order(head_dim)
    rows = torch.cat([h * head_dim + per_head for h in range(num_heads)])
    q, k, v = qkv.split(dim)
    return torch.cat([q[rows], k[rows], v]).contiguous()


def timm_state_dict(backbone: VisionTransformer) -> dict[str, Tensor]:
    """The weights of ``backbone`` under timm's names (and layout, for RoPE)."""
    num_heads = backbone.embed_dim // backbone.head_dim
    renames = _RENAMES + (_EVA_RENAMES if backbone.rope else [])
    out: dict[str, Tensor] = {}
    for key, value in backbone.state_dict().items():
        if not _OUR_KEYS.fullmatch(key):
            raise _refuse(f"weight {key}", "a tensor timm's ViT has no place for")
        value = value.detach().cpu()
        if backbone.rope and key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            value = _reorder_query_key(value, num_heads)
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value.contiguous().clone()
    if not backbone.rope:  # the fixed table, a buffer of ours, is timm's learned pos_embed
        out["pos_embed"] = backbone.pos_embed.detach().cpu().unsqueeze(0).clone()
    elif not any(k.endswith(".gamma_1") for k in out):  # unit gains: see timm_arguments
        for i in range(len(backbone.blocks)):
            for gamma in ("gamma_1", "gamma_2"):
                out[f"blocks.{i}.{gamma}"] = torch.ones(backbone.embed_dim)
    return out


def pretrained_cfg(encoder: Encoder, weights: Path) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay``: the file, our input normalisation and size, no head.
    ``num_classes=0`` keeps timm's loading strict (it relaxes it when dropping a classifier)."""
    size = encoder.image_size
    return {
        "file": str(weights.resolve()),
        "mean": encoder.mean.flatten().tolist(),
        "std": encoder.std.flatten().tolist(),
        "input_size": [encoder.channels, size, size],
        "crop_pct": 1.0,  # hjepa resizes the whole image: no centre crop
        "interpolation": "bilinear",
        "num_classes": 0,
    }


def load_line(create_model: dict[str, Any]) -> str:
    """The one Python line that builds the exported model in timm."""
    args = ", ".join(f"{k}={v!r}" for k, v in create_model.items() if k != "model_name")
    return f"timm.create_model({create_model['model_name']!r}, {args})"


def export_timm(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None
) -> tuple[Path, Path, str]:
    """Write the target encoder of ``run_dir`` for timm; returns ``(weights, card, load line)``.

    ``out`` defaults to ``RUN_DIR/encoder_timm.safetensors``; the card (same name, ``.json``)
    holds ``create_model``, the keyword arguments of ``timm.create_model`` that load it.
    """
    source = checkpoint_path(Path(run_dir), checkpoint)
    state = ckpt.load_checkpoint(source)
    try:
        cfg = from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{source} holds no valid config: {e}") from e
    weights = Path(out) if out else Path(run_dir) / "encoder_timm.safetensors"
    if weights.suffix != ".safetensors":
        raise ValueError(f"--out {weights} must end in .safetensors")
    check_exportable(cfg.model)  # before any work: the refusal is the answer
    step = int(state["step"])
    encoder = encoder_from_state(
        state["target_encoder"], state["config"], step=step, source=str(source)
    )
    name, kwargs = timm_arguments(cfg, encoder.channels)
    tensors = timm_state_dict(encoder.backbone)
    meta = {
        "format": "pt",
        "hjepa": FORMAT,
        "timm_model_name": name,
        "timm_model_kwargs": json.dumps(kwargs),
    }
    data = save(tensors, metadata=meta)
    ckpt.atomic_write(weights, lambda f: f.write(data), what="timm export")
    create_model = {
        "model_name": name,
        "pretrained": True,
        "pretrained_cfg_overlay": pretrained_cfg(encoder, weights),
        **kwargs,
    }
    card = _card(encoder, weights, data, step, create_model)
    card_file = weights.with_suffix(".json")
    text = json.dumps(card, indent=2).encode()
    ckpt.atomic_write(card_file, lambda f: f.write(text), what="timm export card")
    return weights, card_file, load_line(create_model)


def _card(encoder, weights: Path, data: bytes, step: int, create_model: dict) -> dict:
    """The JSON card beside the weights: how timm loads them and what its outputs mean."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "step": step,
        "timm_version": TIMM_VERSION,
        "create_model": create_model,
        "outputs": {
            "forward_features": "[B, N, D]: hjepa's level-0 tokens (Encoder.tokens) of the "
            "same images normalised with mean/std",
            "pooled (forward_head)": "the mean of those tokens; hjepa's levelL features "
            "layer-normalise (no affine) each pooled cell first: "
            "hjepa.eval.features.pooled_features(tokens, grid_size, levels)",
        },
        "grid_size": encoder.backbone.grid_size,
        "levels": encoder.levels,
        "data": {
            "name": encoder.data_name,
            "channels": encoder.channels,
            "image_size": encoder.image_size,
        },
    }


__all__ = ["NotExportable", "check_exportable", "export_timm", "timm_arguments", "timm_state_dict"]
