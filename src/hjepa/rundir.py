"""What a run directory records besides its config and weights.

* :func:`checkpoint_path`: which checkpoint a command reads (``--checkpoint``, default
  ``checkpoints/last.pt``).
* :func:`record_invocation`: one JSON line per ``hjepa train`` invocation in
  ``invocations.jsonl`` (command line, versions, git commit of the code when it runs from a
  checkout, host, device, start time, the step it started from), appended, so a resumed run
  keeps the record of every process that trained it while ``config.yaml`` stays as written.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from hjepa import checkpoint as ckpt

INVOCATIONS = "invocations.jsonl"


def checkpoint_path(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint`` when given (it must exist), else ``RUN_DIR/checkpoints/last.pt``."""
    if checkpoint is None or str(checkpoint) == "":
        return ckpt.checkpoint_dir(run_dir) / ckpt.LAST
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} is not a file")
    return path


def git_commit(source: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout hjepa runs from, or None (an installed copy).

    The package file must be tracked by that repository: a virtual environment inside some
    other project's checkout must not report that project's commit.
    """
    source = source or Path(__file__).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(source.parent), *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", source.name) is None:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def hjepa_version() -> str:
    from hjepa import __version__

    return __version__


def command_line() -> list[str]:
    """``sys.argv`` as typed: ``hjepa train ...``, or ``python -m hjepa train ...``."""
    program = Path(sys.argv[0]).name
    head = ["python", "-m", "hjepa"] if program == "__main__.py" else [program]
    return [*head, *sys.argv[1:]]


def invocation_record(device: Any, *, step: int, world_size: int = 1) -> dict[str, Any]:
    """What :func:`record_invocation` writes, as a dict."""
    record: dict[str, Any] = {
        "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "python_executable": sys.executable,
        "cwd": os.getcwd(),
        "start_step": step,
        "hjepa": hjepa_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "host": socket.gethostname(),
        "device": str(device),
        "world_size": world_size,
    }
    if getattr(device, "type", None) == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
    return record


def record_invocation(
    run_dir: str | Path, device: Any, *, step: int, world_size: int = 1
) -> dict[str, Any]:
    """Append this process's :func:`invocation_record` to ``RUN_DIR/invocations.jsonl``."""
    record = invocation_record(device, step=step, world_size=world_size)
    with (Path(run_dir) / INVOCATIONS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_invocations(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / INVOCATIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "checkpoint_path",
    "record_invocation",
    "read_invocations",
    "invocation_record",
    "git_commit",
    "INVOCATIONS",
]
