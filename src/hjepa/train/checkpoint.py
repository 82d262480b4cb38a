"""Atomic, resumable checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the old one, so a crash at any moment leaves either the previous complete checkpoint or the
new complete one, never a partial file. Loading uses ``weights_only=True``: a checkpoint can
hold tensors and plain containers, never code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable or not a plain-weights checkpoint ({first}); "
            "delete it to resume from an older one, or start a new run.dir"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not an hjepa checkpoint (no 'step')")
    return state


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def candidates(run_dir: str | Path) -> list[Path]:
    """``last.pt`` first, then periodic checkpoints newest first."""
    ckpt = checkpoint_dir(run_dir)
    periodic = sorted(ckpt.glob("step_*.pt"), key=_step_of, reverse=True)
    last = ckpt / LAST
    return ([last] if last.is_file() else []) + periodic


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1
