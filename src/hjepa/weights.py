"""``hjepa.load_encoder``: one entry point over the three places trained weights live.

A run directory, a checkpoint file and an exported ``.safetensors`` all become the same
:class:`~hjepa.encoder.Encoder`; this module sits above :mod:`hjepa.encoder` and
:mod:`hjepa.export`, which import neither it nor each other's loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hjepa import checkpoint as ckpt
from hjepa.encoder import Encoder, encoder_from_state
from hjepa.export import load_exported


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> Encoder:
    """The trained target encoder of ``path``, in eval mode, ready for images in [0, 1].

    ``path`` is a run directory (its ``checkpoints/last.pt``), a checkpoint file (``.pt``)
    or an exported encoder (``.safetensors`` or its ``.json`` card, from ``hjepa export``).
    The same weights give the same features whichever of them they come from. Example::

        enc = hjepa.load_encoder("runs/quickstart")
        with torch.no_grad():
            feats = enc.features(images)  # images [B, C, H, W] in [0, 1]
    """
    path = Path(path)
    ckpt.check_map_location(map_location)  # no GPU is no fault of the file: said before reading
    if path.suffix in (".safetensors", ".json"):
        return load_exported(path, map_location)
    if path.is_dir():
        path = ckpt.checkpoint_dir(path) / ckpt.LAST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: give a run directory of hjepa train, a checkpoint .pt "
                "or an exported .safetensors"
            )
    elif not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = ckpt.load_checkpoint(path, map_location=map_location)
    if "target_encoder" not in state or "config" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path} holds no target encoder and config")
    return encoder_from_state(
        state["target_encoder"], state["config"], step=int(state["step"]), source=str(path)
    ).to(map_location)


__all__ = ["load_encoder"]
