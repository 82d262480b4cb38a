"""Metrics sinks: ``metrics.jsonl`` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard. ``start_step``: the step this invocation
    starts from; TensorBoard drops the values an earlier, killed process logged past it (a
    "purge" marker in the new event file), as :func:`truncate_after` does for the JSONL."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, start_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1
            )

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        record = {"step": step, "kind": kind, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    # A line cut short by a killed writer is skipped (the next resume drops it for good).
    records = [json.loads(line) for line in lines if _step_of_line(line) is not None]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _step_of_line(line: str) -> int | None:
    """The record's step, or None for a line cut short by a killed writer."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop records past ``step`` (written by a run that died before its next checkpoint) and
    any partial line a killed writer left. The rewrite is atomic (temp file, then rename)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            line_step = _step_of_line(line) if line.strip() else None
            if line_step is not None and line_step <= step:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
