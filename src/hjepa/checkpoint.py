"""Checkpoint files: atomic writes, plain-weights loading, and finding the newest usable one.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the old one (``os.replace`` is atomic on POSIX), and the directory is fsynced, so a
crash or ``kill -9`` at any moment leaves either the previous complete checkpoint or the new
complete one under the final name, never a partial file. Temporary files have the pattern
``.<name>.<random>.tmp``; a writer killed mid-write leaves one behind, and
:func:`remove_stale_temp` deletes them when the next run starts.

Loading uses ``weights_only=True``: a checkpoint can hold tensors and plain containers, never
code, so a hostile pickle is refused instead of executed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
CORRUPT_SUFFIX = ".corrupt"
# Test hook: seconds to pause inside atomic_write with half of the file written, so a test can
# SIGKILL a writer mid-checkpoint deterministically (tests/test_reliability.py). Unset normally.
PAUSE_ENV = "HJEPA_FAULT_CHECKPOINT_PAUSE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint that cannot be written (disk full, read-only, not a directory...).

    The previous checkpoint under the same name is untouched. ``errno`` is the cause's.
    """

    def __init__(self, code: int | None, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _temp_prefix(name: str) -> str:
    return f".{name}."


def atomic_write(path: str | Path, write: Any, what: str = "checkpoint") -> None:
    """Write ``path`` atomically: ``write(file)`` fills a temp file that is then renamed.

    Any ``OSError`` (``ENOSPC``, ``EACCES``, ``ENOTDIR``...) becomes a
    :class:`CheckpointWriteError` naming ``path``; the old file, if any, is left as it was and
    the temp file is removed.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it what open() would
        with os.fdopen(fd, "wb") as f:
            pause = os.environ.get(PAUSE_ENV)
            if pause:  # test hook: leave a half-written temp file on disk for a while
                buffer = io.BytesIO()
                write(buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(float(pause))
                f.write(data[len(data) // 2 :])
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        reason = e.strerror or str(e) or errno.errorcode.get(e.errno or 0, type(e).__name__)
        raise CheckpointWriteError(e.errno, f"cannot write {what} to {path}: {reason}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process umask: read from /proc where Linux shows it, else set and put back at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp(directory: str | Path) -> list[Path]:
    """Delete temp files left by a writer that was killed before its rename; returns them.

    Only call this when no other process writes into ``directory`` (one trainer per run dir).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a plain-weights checkpoint; :class:`CheckpointError` (naming the file and what is
    wrong with it) otherwise, and ``ValueError`` for a ``map_location`` this machine lacks."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_map_location(map_location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        ImportError,
        IndexError,
        OSError,
    ) as e:
        what = _damage(path) or (
            f"is unreadable or not a plain-weights checkpoint ({first_sentence(e)})"
        )
        raise CheckpointError(
            f"checkpoint {path} {what}; move it aside to resume from an older one, or start a "
            "new run.dir"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not an hjepa checkpoint (no 'step')")
    return state


def check_map_location(map_location: Any) -> None:
    """Refuse a device this machine does not have before reading a file (torch would report
    the file as unreadable). Callables and dicts are torch's own remapping: passed through."""
    if not isinstance(map_location, str | torch.device):
        return
    device = torch.device(map_location)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"only {count} CUDA GPU(s) are visible" if count else "no CUDA GPU is visible"
            raise ValueError(
                f"map_location={str(map_location)!r} but {have}: load with map_location='cpu' "
                "(the checkpoint itself is fine)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("map_location='mps' but MPS is not available: use map_location='cpu'")


def _damage(path: Path) -> str | None:
    """What a file that failed to load shows of itself: empty, or a zip archive (torch's
    format) cut short, which lacks the end record a complete archive finishes with."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(0, size - (1 << 16) - 22))  # the end record sits in the last 64 KiB + 22
        tail = f.read()
    if head == b"PK\x03\x04" and b"PK\x05\x06" not in tail:
        return f"is truncated at byte {size} of a zip archive (a write or copy that did not finish)"
    return None


def first_sentence(error: BaseException, limit: int = 300) -> str:
    """The first sentence of an error's message, whole (long ones end at a sentence or, at
    worst, a word boundary, marked with an ellipsis), or the error's type."""
    text = " ".join(str(error).split()) or type(error).__name__
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def state_mismatch(model_state: dict[str, Any], saved: Any, shown: int = 3) -> str:
    """How ``saved`` misfits ``model_state``: ``key: saved [a, b] vs model [c, d]``, then keys
    missing from it and keys the model lacks (the first ``shown`` of each)."""
    if not isinstance(saved, dict):
        return f"the saved weights are a {type(saved).__name__}, not a state dict"
    shapes = [
        f"{k}: saved {list(saved[k].shape)} vs model {list(v.shape)}"
        for k, v in model_state.items()
        if k in saved and getattr(saved[k], "shape", v.shape) != v.shape
    ]
    missing = [k for k in model_state if k not in saved]
    extra = [k for k in saved if k not in model_state]

    def listed(items: list[str], prefix: str = "") -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return f"{prefix}{', '.join(items[:shown])}{more}" if items else ""

    parts = [listed(shapes), listed(missing, "missing "), listed(extra, "unexpected ")]
    return "; ".join(p for p in parts if p) or "the weights do not fit the model"


def load_module_state(module: torch.nn.Module, state: Any, name: str = "") -> None:
    """``module.load_state_dict(state)`` (strict); a misfit is a ``RuntimeError`` that names
    it (:func:`state_mismatch`), prefixed with ``name``."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        prefix = f"{name}: " if name else ""
        raise RuntimeError(prefix + state_mismatch(module.state_dict(), state)) from e


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def candidates(run_dir: str | Path) -> list[Path]:
    """``last.pt`` first, then periodic checkpoints ``step_*.pt`` newest first."""
    ckpt = checkpoint_dir(run_dir)
    periodic = sorted(
        (p for p in ckpt.glob("step_*.pt") if _step_of(p) >= 0), key=_step_of, reverse=True
    )
    last = ckpt / LAST
    return ([last] if last.is_file() else []) + periodic


def move_aside(path: str | Path) -> Path:
    """Rename a bad checkpoint to ``<name>.corrupt`` (``.corrupt.1``... if taken), not delete it."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(path, target)
    return target


class CheckpointWarning(UserWarning):
    """Resuming from an older checkpoint because a newer one is unusable."""


def restore_latest(run_dir: str | Path, restore: Callable[[Path], None]) -> Path | None:
    """Resume from the newest usable checkpoint of ``run_dir``; returns its path (None: none).

    ``restore(path)`` loads one candidate and raises :class:`CheckpointError` when that file is
    unusable (unreadable, hostile, wrong shapes); other errors (a config that contradicts the
    run) propagate. Candidates are ``last.pt`` then ``step_*.pt`` newest first. When an older one
    is used, every newer unusable file is renamed ``<name>.corrupt`` (kept for inspection, and
    so it is never loaded or overwritten later) and a :class:`CheckpointWarning` says so. When
    none is usable, nothing is renamed and a :class:`CheckpointError` lists what was tried.
    """
    failed: list[tuple[Path, CheckpointError]] = []
    for path in candidates(run_dir):
        try:
            restore(path)
        except CheckpointError as e:
            failed.append((path, e))
            continue
        if failed:
            moved = [f"{p.name} -> {move_aside(p).name}" for p, _ in failed]
            warnings.warn(
                f"{failed[0][1]}; resumed from the older {path} instead and moved the unusable "
                f"file(s) aside ({', '.join(moved)})",
                CheckpointWarning,
                stacklevel=2,
            )
        return path
    if not failed:
        return None
    if len(failed) == 1:
        raise CheckpointError(
            f"{failed[0][1]} (there is no older checkpoints/step_*.pt to fall back on; "
            "run.keep_every > 0 keeps them)"
        )
    tried = "; ".join(str(e) for _, e in failed[1:])
    raise CheckpointError(f"{failed[0][1]}; no older checkpoint is usable either: {tried}")


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1
