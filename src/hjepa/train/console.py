"""The training terminal: one progress bar, and every message printed above it, not into it.

:func:`say` and, inside :func:`warnings_above`, Python warnings (from hjepa, torch or anything
else) go through ``tqdm.write``: it clears the open bars, prints the message on its own line
and redraws the bars below it (a plain print when no bar is open).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO


def progress_bar(enabled: bool, initial: int, total: int):
    """The bar over the run's steps (drawn on stderr when ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def say(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` above the progress bar (to stdout unless ``file``)."""
    from tqdm import tqdm

    tqdm.write(text, file=file or sys.stdout)


@contextlib.contextmanager
def warnings_above() -> Iterator[None]:
    """Show the warnings of the block on stderr through :func:`say`."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        say(text.rstrip("\n"), file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def probe_line(step: int, probed: dict[str, Any]) -> str:
    """``step 200: online kNN level0 0.7123 ... concat 0.7301`` (+ the linear probes, if any)."""
    parts = [f"step {step}: online kNN"]
    parts += [f"{k[4:]} {v:.4f}" for k, v in probed.items() if k.startswith("knn_")]
    linear = [f"{k[7:]} {v:.4f}" for k, v in probed.items() if k.startswith("linear_")]
    if linear:
        parts += ["| linear", *linear]
    return " ".join(parts)


__all__ = ["progress_bar", "say", "warnings_above", "probe_line"]
