"""Share a trained encoder without pickles: ``safetensors`` weights plus a small JSON card.

``hjepa export RUN_DIR [--checkpoint PATH]`` writes the target encoder of a checkpoint
(default ``RUN_DIR/checkpoints/last.pt``; the encoder that ``hjepa eval`` probes) as
``encoder.safetensors`` and, next to it, ``encoder.json``: the resolved config needed to
rebuild the architecture (``run.dir`` and ``data.root`` blanked: they are local paths), and,
readable without hjepa, the architecture, the hierarchy levels and feature widths, the data it
was trained on (name, channels, image size), the per-channel normalisation of its input and the
SHA-256 of the weights file. Safetensors is a flat tensor format with no code in it, so an
exported encoder can be loaded from anyone: :func:`load_exported` checks the hash, rebuilds
the :class:`~hjepa.encoder.Encoder` (what ``hjepa.load_encoder`` returns) and loads the weights
strictly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from hjepa import checkpoint as ckpt
from hjepa.config import ConfigError, from_dict
from hjepa.data.normalize import channel_stats
from hjepa.encoder import Encoder, encoder_from_state
from hjepa.models.vit import VisionTransformer, input_channels
from hjepa.rundir import checkpoint_path

FORMAT = "hjepa.encoder"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """An exported encoder that cannot be rebuilt; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(weights: str | Path) -> Path:
    """The JSON card that goes with a weights file: same name, ``.json`` suffix."""
    return Path(weights).with_suffix(".json")


def export_run(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None
) -> tuple[Path, Path]:
    """Export the target encoder of ``run_dir``; returns ``(weights, card)`` paths.

    ``checkpoint`` defaults to the run's ``last.pt``; ``out`` to ``RUN_DIR/encoder.safetensors``.
    Both files are written atomically.
    """
    run_dir = Path(run_dir)
    source = checkpoint_path(run_dir, checkpoint)
    state = ckpt.load_checkpoint(source)
    try:
        cfg = from_dict(state["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{source} holds no valid config: {e}") from e
    weights = Path(out) if out else run_dir / "encoder.safetensors"
    if weights.suffix != ".safetensors":
        raise ValueError(f"--out {weights} must end in .safetensors")
    channels = input_channels(state["target_encoder"])
    # Contiguous copies: safetensors refuses views and tensors that share memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["target_encoder"].items()}
    ckpt.atomic_write(
        weights, lambda f: f.write(_safetensors_bytes(tensors)), what="exported encoder"
    )
    tree = cfg.to_dict()
    tree["run"]["dir"], tree["data"]["root"] = "", ""
    mean, std = channel_stats(cfg.data.name, channels)
    m, dim = cfg.model, cfg.model.embed_dim
    card: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights.name,
        "sha256": _sha256(weights),
        "step": int(state["step"]),
        "image_size": cfg.data.image_size,
        "in_channels": channels,
        "normalize": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
        "input": "images [B, C, H, W] in [0, 1], then (x - mean) / std per channel",
        "data": {"name": cfg.data.name, "channels": channels, "image_size": cfg.data.image_size},
        "architecture": {
            "type": "vit",
            "patch_size": m.patch_size,
            "embed_dim": dim,
            "depth": m.depth,
            "num_heads": m.num_heads,
            "pos_embed": m.pos_embed,
            "tokens": (cfg.data.image_size // m.patch_size) ** 2,
        },
        "levels": m.levels,
        "feature_dims": {
            **{f"level{lvl}": dim for lvl in range(m.levels)},
            "concat": dim * m.levels,
        },
        "config": tree,
    }
    text = json.dumps(card, indent=2).encode()
    ckpt.atomic_write(card_path(weights), lambda f: f.write(text), what="exported encoder card")
    return weights, card_path(weights)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt", "hjepa": FORMAT})


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> Encoder:
    """Rebuild an exported encoder (in eval mode) from its ``.safetensors`` or ``.json`` path."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    card_file = card_path(weights)
    if not card_file.is_file():
        raise FileNotFoundError(f"{card_file} not found: export with `hjepa export RUN_DIR`")
    try:
        card = json.loads(card_file.read_text())
        if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
            raise ExportError(
                f"{card_file} is not an {FORMAT} v{FORMAT_VERSION} card "
                f"(format {card.get('format')!r} v{card.get('format_version')!r})"
            )
        from_dict(card["config"])
        step = int(card["step"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise ExportError(f"{card_file} is not a valid exported-encoder card ({e})") from e
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (named by {card_file})")
    if _sha256(weights) != card.get("sha256"):
        raise ExportError(
            f"{weights} does not match the SHA-256 in {card_file}: the file is damaged or not "
            "the one exported with this card; export it again"
        )
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{weights} is not a readable safetensors file ({e})") from e
    try:
        encoder = encoder_from_state(tensors, card["config"], step=step, source=str(weights))
    except ckpt.CheckpointError as e:
        raise ExportError(f"{weights} does not fit the architecture in {card_file} ({e})") from e
    return encoder.to(map_location)


def load_exported_encoder(path: str | Path, map_location: str = "cpu") -> VisionTransformer:
    """The bare :class:`VisionTransformer` of an exported encoder: raw tokens, no normalisation
    (:func:`load_exported` / ``hjepa.load_encoder`` add it and the pooled features)."""
    return load_exported(path, map_location).backbone


__all__ = ["export_run", "load_exported", "load_exported_encoder", "card_path", "ExportError"]
