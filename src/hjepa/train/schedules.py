"""Per-step schedules of the learning rate, weight decay and EMA momentum.

All are pure functions of the optimizer step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, final: float):
    """Linear ``start -> peak`` over ``warmup`` steps, then cosine to ``final`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, final: float) -> float:
    """Cosine from ``start`` (step 0) to ``final`` (step ``total``); I-JEPA's weight decay."""
    progress = min(1.0, step / max(1, total))
    return final + 0.5 * (start - final) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, final: float) -> float:
    """Linear ``start -> final`` over ``total`` steps; I-JEPA's EMA momentum (0.996 -> 1.0)."""
    return start + (final - start) * min(1.0, step / max(1, total))
